"""The rate-limit rules on hand-built contexts: keys, tiers, postmaster exemption, the reply."""

import pytest

from maild.address import parse_path
from maild.antispam.limiter import Limiter
from maild.components import parse
from maild.policy import pipeline
from maild.policy.context import Client, Context, Identity, Message, Stage
from maild.policy.ratelimit import limits_for
from maild.policy.services import Services

CONFIG = parse(
    {
        "headers": {"enabled": False},
        "postmaster": {"domains": ["hosted.example"]},
        "ratelimit": {
            "messages": ["3/1h"],
            "same_recipient": ["2/1h"],
            "bytes": ["1000/1h"],
            "tiers": {"big": {"messages": ["100/1h"]}},
        },
        "customers": [
            {"name": "acme", "networks": ["192.0.2.0/24"]},
            {
                "name": "bigco",
                "networks": ["198.51.100.0/24"],
                "tier": "big",
                "ratelimit": {"recipients_per_message": 2},
            },
        ],
    }
)


class Clock:
    t = 1e6

    def __call__(self):
        return self.t


services = Services()  # the contexts' services: a fresh limiter per test


@pytest.fixture(autouse=True)
def limiter():
    services.limiter = Limiter(Clock())
    yield services.limiter
    services.limiter = None


def ctx_for(customer: str, ip: str = "192.0.2.1") -> Context:
    ctx = Context(config=CONFIG, session_id="T", client=Client(addr=ip), services=services)
    ctx.identity = Identity(CONFIG.customer(customer), "network")
    ctx.sender = parse_path("<a@acme.example>")
    return ctx


async def send(
    customer: str, rcpts: list[str], body: bytes = b"Subject: x\r\n\r\nhi\r\n", accept: bool = True
) -> tuple[list, object]:
    ctx = ctx_for(customer)
    codes = []
    for r in rcpts:
        ctx.rcpt = parse_path(f"<{r}>")
        v = await pipeline.run(Stage.RCPT, ctx)
        codes.append(v)
        if v.accepted:
            ctx.recipients.append(ctx.rcpt)
            if ctx.postmaster_only is None:
                ctx.postmaster_only = v.rule == "postmaster"
    dv = None
    if ctx.recipients:
        ctx.message = Message(body)
        dv = await pipeline.run(Stage.DATA, ctx)
        pipeline.finish(ctx, accept and dv.accepted)
    else:
        pipeline.finish(ctx, False)
    return codes, dv


async def test_fourth_message_refused_with_name_and_time():
    for i in range(3):
        codes, dv = await send("acme", [f"x{i}@outside.example"])
        assert codes[0].accepted and dv.accepted
    codes, _ = await send("acme", ["y@outside.example"])
    v = codes[0]
    assert (v.code, v.status, v.rule, v.strike) == (450, "4.7.1", "ratelimit", True)
    assert "messages (3/1h)" in v.reason and "20 minutes" in v.reason


async def test_refused_or_aborted_mail_is_not_charged():
    for _ in range(5):
        await send("acme", ["x@outside.example"], accept=False)
    codes, dv = await send("acme", ["x@outside.example"])
    assert codes[0].accepted


async def test_same_recipient_normalised_case_and_plus():
    await send("acme", ["Bob+a@Outside.Example"])
    await send("acme", ["bob+b@outside.example"])
    codes, _ = await send("acme", ["BOB@outside.example"])
    assert codes[0].rule == "ratelimit" and "same_recipient" in codes[0].reason


async def test_postmaster_never_limited():
    for i in range(3):
        await send("acme", [f"x{i}@outside.example"])
    for _ in range(5):
        codes, dv = await send("acme", ["postmaster@hosted.example"])
        assert codes[0].accepted and dv.accepted


async def test_bytes_at_end_of_data():
    codes, dv = await send(
        "acme", ["x@outside.example"], body=b"Subject: x\r\n\r\n" + b"y" * 2000 + b"\r\n"
    )
    assert codes[0].accepted and not dv.accepted and "bytes" in dv.reason


async def test_tier_and_override():
    lim = limits_for(ctx_for("bigco"))
    assert lim.messages[0].limit == 100 and lim.recipients_per_message == 2
    assert limits_for(ctx_for("acme")).messages[0].limit == 3
    codes, _ = await send("bigco", ["a@o.example", "b@o.example", "c@o.example"])
    assert [c.code for c in codes] == [250, 250, 452]


async def test_unidentified_clients_not_limited_by_default():
    ctx = Context(config=CONFIG, session_id="T", client=Client(addr="203.0.113.1"))
    assert limits_for(ctx) is None


DEFAULTS = parse(
    {
        "headers": {"enabled": False},
        "postmaster": {"domains": ["hosted.example"]},
        "customers": [{"name": "acme", "networks": ["192.0.2.0/24"]}],
    }
)


async def test_default_windows_accept_exactly_200_messages_an_hour(monkeypatch):
    """The shipped messages = ["200/1h", "2000/1d"]: each window counts a message once."""
    monkeypatch.setattr(f"{__name__}.CONFIG", DEFAULTS)
    assert [r.text for r in limits_for(ctx_for("acme")).messages] == ["200/1h", "2000/1d"]
    for i in range(200):
        codes, dv = await send("acme", [f"x{i}@outside.example"])
        assert codes[0].accepted and dv.accepted, (i, codes[0].reason)
    codes, _ = await send("acme", ["y@outside.example"])
    assert codes[0].code == 450 and "messages (200/1h)" in codes[0].reason
