"""The order table (maild/policy/chain.py): every declared rule listed exactly once, in
the order docs/policies.md shows."""

from __future__ import annotations

import importlib
import pkgutil
import re
import types
from pathlib import Path

import pytest

import maild.policy as pkg
from maild.policy import chain, identity, pipeline, postmaster, relay
from maild.policy.chain import ChainError, build
from maild.policy.context import Stage

DOC = Path(__file__).parents[2] / "docs" / "policies.md"


def all_policy_modules() -> list[types.ModuleType]:
    return [
        importlib.import_module(f"maild.policy.{m.name}")
        for m in pkgutil.iter_modules(pkg.__path__)
    ]


def test_every_rule_of_every_policy_module_is_in_the_table():
    """A new family file whose rule has no line in the table fails here (and at start-up,
    once the table imports it)."""
    build(chain.TABLE, all_policy_modules())
    chain.check_finish(chain.FINISH, all_policy_modules())


def test_the_order_is_the_one_maild_had():
    """The effective order before the table (the order= integers, ties broken by import
    order: header-syntax before ratelimit, bulk before return-path-owner,
    sender-domain-unknown before optin)."""
    names = {s: [r.name for r in rules] for s, rules in chain.CHAIN.items()}
    assert names[Stage.MAIL] == [
        "helo-invalid",
        "helo-ours",
        "envelope-owner",
        "sender-domain-unknown",
    ]
    assert names[Stage.RCPT] == [
        "recipients-per-message",
        "postmaster",
        "mail-stage",
        "blocked",
        "relay",
        "ratelimit",
        "optin",
    ]
    assert names[Stage.DATA] == [
        "postmaster",
        "blocked",
        "relay",
        "header-syntax",
        "ratelimit",
        "from-missing",
        "from-multiple",
        "from-invalid",
        "header-duplicate",
        "date-missing",
        "date-invalid",
        "date-future",
        "date-past",
        "message-id-missing",
        "message-id-invalid",
        "received-forged",
        "helo-invalid",
        "helo-ours",
        "envelope-owner",
        "null-sender",
        "null-sender-rate",
        "from-owner",
        "sender-owner",
        "reply-to-owner",
        "bulk",
        "return-path-owner",
        "display-name-spoof",
        "sender-domain-unknown",
        "optin",
        "from-domain-unknown",
        "optin-one-click",
    ]
    assert [h.fn.__name__ for h in chain.FINISH] == [
        "bulk_finish",
        "null_sender_finish",
        "optin_finish",
        "ratelimit_finish",
    ]


def _table(**changes: tuple[object, ...]) -> dict[Stage, tuple[object, ...]]:
    t = dict(chain.TABLE)
    for stage, entries in changes.items():
        t[Stage(stage)] = entries
    return t  # type: ignore[return-value]


def test_a_rule_listed_twice_is_named():
    rcpt = chain.TABLE[Stage.RCPT] + (relay.relay_rcpt,)
    with pytest.raises(ChainError, match="rule relay is listed twice at RCPT"):
        build(_table(RCPT=rcpt), chain.FAMILIES)  # type: ignore[arg-type]


def test_a_rule_declared_but_not_listed_is_named():
    rcpt = tuple(e for e in chain.TABLE[Stage.RCPT] if e is not relay.relay_rcpt)
    with pytest.raises(
        ChainError,
        match=r"declared but not in the order table.*"
        r"maild\.policy\.relay\.relay_rcpt \(RCPT relay\)",
    ):
        build(_table(RCPT=rcpt), chain.FAMILIES)  # type: ignore[arg-type]
    data = tuple(
        e for i, e in enumerate(chain.TABLE[Stage.DATA]) if not (e is identity.helo_ours and i > 0)
    )
    with pytest.raises(ChainError, match=r"maild\.policy\.identity\.helo_ours \(DATA helo-ours\)"):
        build(_table(DATA=data), chain.FAMILIES)  # type: ignore[arg-type]


def test_a_rule_listed_but_not_declared_is_named():
    def helper(ctx):  # a function without @rule
        return None

    with pytest.raises(ChainError, match="helper is listed at RCPT but is not a declared rule"):
        build(_table(RCPT=chain.TABLE[Stage.RCPT] + (helper,)), chain.FAMILIES)  # type: ignore[arg-type]
    with pytest.raises(ChainError, match="rule postmaster is listed at MAIL but declared for RCPT"):
        build(_table(MAIL=(postmaster.postmaster_rcpt,) + chain.TABLE[Stage.MAIL]), chain.FAMILIES)  # type: ignore[arg-type]


def test_a_finish_hook_not_listed_is_named():
    with pytest.raises(ChainError, match="maild.policy.bulk.bulk_finish"):
        chain.check_finish(chain.FINISH[1:], chain.FAMILIES)


def test_a_new_rule_is_one_file_and_one_line(tmp_path, monkeypatch):
    """What a newcomer writes: a module declaring a rule, and its line in the table."""
    mod = types.ModuleType("maild.policy.newcomer")
    exec(
        "from maild.policy.context import Stage\n"
        "from maild.policy.rules import rule\n"
        "from maild.policy.verdict import reject\n"
        "@rule(Stage.RCPT, 'newcomer')\n"
        "def newcomer(ctx):\n"
        "    return reject(550, '5.7.1', 'no', 'newcomer')\n",
        mod.__dict__,
    )
    rules = build(
        _table(RCPT=chain.TABLE[Stage.RCPT] + (mod.newcomer,)),  # type: ignore[arg-type]
        chain.FAMILIES + (mod,),
    )
    assert rules[Stage.RCPT][-1].name == "newcomer"
    with pytest.raises(ChainError, match="newcomer"):
        build(chain.TABLE, chain.FAMILIES + (mod,))


def test_docs_show_the_table():
    text = DOC.read_text()
    section = text[text.index("## The rule order") :]
    rows = re.findall(
        r"^\| (CONNECT|MAIL|RCPT|DATA) \| (\d+) \| `([^`]+)` \| (\w+)\.py \| (yes|) \|$",
        section,
        re.M,
    )
    assert [(s, int(i), n, f, y == "yes") for s, i, n, f, y in rows] == chain.describe()


async def test_run_follows_the_table(make_ctx):
    """pipeline.run uses CHAIN: a refusal by an earlier line hides a later one."""
    from maild.address import parse_path

    ctx = make_ctx()
    ctx.rcpt = parse_path("<x@outside.example>")
    v = await pipeline.run(Stage.RCPT, ctx)
    assert v.rule == "relay"
