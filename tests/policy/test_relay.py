"""Open-relay protection, judged by where an address would really go."""

import pytest

from maild.address import parse_path
from maild.policy import pipeline
from maild.policy.context import Stage
from maild.policy.customer import resolve
from maild.policy.relay import relay_data, relay_rcpt

BATTERY = [  # ANCHORS.md section 2, nmap smtp-open-relay, D=outside.example S=mx.hosted.example
    "<relaytest@outside.example>",
    "<relaytest%outside.example@[127.0.0.1]>",
    "<relaytest%outside.example@mx.hosted.example>",
    '<"relaytest@outside.example">',
    '<"relaytest%outside.example">',
    "<relaytest@outside.example@[127.0.0.1]>",
    '<"relaytest@outside.example"@[127.0.0.1]>',
    "<relaytest@outside.example@mx.hosted.example>",
    "<@[127.0.0.1]:relaytest@outside.example>",
    "<@mx.hosted.example:relaytest@outside.example>",
    "<outside.example!relaytest>",
    "<outside.example!relaytest@[127.0.0.1]>",
    "<outside.example!relaytest@mx.hosted.example>",
    "<RelayTest@OUTSIDE.example.>",
    "<relaytest%OUTSIDE.EXAMPLE.@Hosted.Example.>",
    "<relaytest>",
]


@pytest.mark.parametrize("path", BATTERY)
def test_stranger_cannot_relay(make_ctx, path):
    ctx = make_ctx()
    ctx.rcpt = parse_path(path)
    v = relay_rcpt(ctx)
    assert v is not None and v.code == 554 and v.status == "5.7.1" and v.rule == "relay"


@pytest.mark.parametrize(
    "path",
    [
        "<bob@hosted.example>",
        "<Bob@HOSTED.EXAMPLE.>",
        "<bob%mx.hosted.example@hosted.example>",
        "<bob@mx.hosted.example>",
    ],
)
def test_stranger_may_mail_hosted_domains(make_ctx, path):
    ctx = make_ctx()
    ctx.rcpt = parse_path(path)
    assert relay_rcpt(ctx) is None


def test_customer_network_may_relay(make_ctx, config):
    ctx = make_ctx(addr="192.0.2.10")
    ctx.identity = resolve(config, ctx.client, sender=ctx.sender)
    ctx.rcpt = parse_path("<bob@outside.example>")
    assert ctx.identity.by == "network" and relay_rcpt(ctx) is None


def test_sender_domain_alone_does_not_authorise_relay(make_ctx, config):
    ctx = make_ctx(sender="<boss@acme.example>")
    ctx.identity = resolve(config, ctx.client, sender=ctx.sender)
    assert ctx.identity.name == "acme" and ctx.identity.by == "domain"
    ctx.rcpt = parse_path("<bob@outside.example>")
    assert relay_rcpt(ctx).code == 554


def test_before_queue_defers_to_login_at_end_of_data(make_ctx, config):
    ctx = make_ctx(addr="203.0.113.5", trusted=True, mode="before-queue")
    ctx.rcpt = parse_path("<bob@outside.example>")
    assert relay_rcpt(ctx) is None and ctx.relay_pending == [ctx.rcpt]
    # no login by end of data: the whole message is refused
    v = relay_data(ctx)
    assert v.code == 554 and "bob@outside.example" in v.reason
    # with the login Postfix reported, it passes
    ctx.identity = resolve(ctx.config, ctx.client, login="alice")
    assert ctx.identity.by == "login" and relay_data(ctx) is None


def test_front_mode_trusted_peer_is_not_deferred(make_ctx):
    ctx = make_ctx(addr="127.0.0.1", trusted=True, mode="front")
    ctx.rcpt = parse_path("<bob@outside.example>")
    assert relay_rcpt(ctx).code == 554


async def test_pipeline_runs_postmaster_before_relay(make_ctx):
    ctx = make_ctx()
    ctx.rcpt = parse_path("<postmaster@outside.example>")
    v = await pipeline.run(Stage.RCPT, ctx)
    assert v.rule == "relay"  # postmaster of a foreign domain is not ours to accept
    ctx.rcpt = parse_path("<POSTMASTER@hosted.example>")
    v = await pipeline.run(Stage.RCPT, ctx)
    assert v.accepted and v.final and v.rule == "postmaster"
