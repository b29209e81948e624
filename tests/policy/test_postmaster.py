"""Postmaster acceptance and the all-or-none split of postmaster transactions."""

import pytest

from maild.address import parse_path
from maild.policy import pipeline
from maild.policy import rules as policy_rules
from maild.policy.chain import CHAIN
from maild.policy.context import Stage
from maild.policy.postmaster import is_postmaster, postmaster_rcpt
from maild.policy.verdict import reject


@pytest.mark.parametrize(
    "path",
    [
        "<Postmaster>",
        "<POSTMASTER>",
        "<postmaster@hosted.example>",
        "<POSTMASTER@HOSTED.EXAMPLE>",
        "<abuse@mx.hosted.example>",
        '<"postmaster"@hosted.example>',
        "<postmaster@hosted.example.>",
    ],
)
def test_postmaster_addresses(config, path):
    assert is_postmaster(parse_path(path), config)


@pytest.mark.parametrize(
    "path",
    [
        "<abuse>",
        "<postmaster@outside.example>",
        "<webmaster@hosted.example>",
        "<@outside.example:postmaster@hosted.example>",
    ],
)
def test_not_postmaster(config, path):
    assert not is_postmaster(parse_path(path), config)


async def test_postmaster_beats_a_rule_that_refuses_everything(make_ctx):
    def refuse_all(ctx):
        return reject(554, "5.7.1", "blocked", "test-block")

    rules = list(CHAIN[Stage.RCPT])
    rules.insert(
        rules.index(postmaster_rcpt) + 1, policy_rules.rule(Stage.RCPT, "test-block")(refuse_all)
    )
    ctx = make_ctx()
    ctx.rcpt = parse_path("<postmaster@hosted.example>")
    assert (await pipeline.run(Stage.RCPT, ctx, rules)).accepted
    ctx.rcpt = parse_path("<bob@hosted.example>")
    assert (await pipeline.run(Stage.RCPT, ctx, rules)).rule == "test-block"


async def test_mixed_transactions_are_split(make_ctx):
    ctx = make_ctx()
    ctx.postmaster_only = True
    ctx.rcpt = parse_path("<bob@hosted.example>")
    v = await pipeline.run(Stage.RCPT, ctx)
    assert (v.code, v.status) == (452, "4.5.3")
    ctx.postmaster_only = False
    ctx.rcpt = parse_path("<abuse@hosted.example>")
    v = await pipeline.run(Stage.RCPT, ctx)
    assert (v.code, v.status) == (452, "4.5.3")


async def test_recipient_limit_applies_to_everyone(make_ctx):
    ctx = make_ctx()
    ctx.recipients = [parse_path(f"<u{i}@hosted.example>") for i in range(3)]
    ctx.rcpt = parse_path("<postmaster@hosted.example>")
    v = await pipeline.run(Stage.RCPT, ctx)
    assert (v.code, v.status, v.rule) == (452, "4.5.3", "recipients-per-message")


async def test_data_stage_postmaster_only_is_final(make_ctx):
    ctx = make_ctx()
    ctx.postmaster_only = True
    v = await pipeline.run(Stage.DATA, ctx)
    assert v.final and v.rule == "postmaster"
