"""The bulk rule: a personalised campaign trips the Breidbart threshold; exemptions vouch."""

import pytest

from maild.address import parse_path
from maild.antispam.campaigns import Campaigns
from maild.components import parse
from maild.policy import bulk, pipeline
from maild.policy.context import Client, Context, Identity, Message, Stage
from maild.policy.services import Services

CONFIG = parse(
    {
        "headers": {"enabled": False},
        "postmaster": {"domains": ["hosted.example"]},
        "ratelimit": {"enabled": False},
        "customers": [{"name": "acme", "networks": ["192.0.2.0/24"]}],
    }
)

TEXT = (
    "Hello {name}, our autumn offer: 40% off every coat in the store at "
    "https://shop.example/coats?ref={name}{n} until {n} December. Best wishes, the shop"
)


services = Services()  # the contexts' services: a fresh campaign memory per test


@pytest.fixture(autouse=True)
def campaigns():
    services.campaigns = Campaigns()
    yield services.campaigns
    services.campaigns = None


async def copy(n: int, recipients: int, text: str = TEXT):
    ctx = Context(config=CONFIG, session_id="T", client=Client(addr="192.0.2.1"), services=services)
    ctx.identity = Identity(CONFIG.customer("acme"), "network")
    ctx.recipients = [parse_path(f"<user{n}x{i}@outside.example>") for i in range(recipients)]
    name = ["anna", "bert", "cleo", "dirk", "emma", "fred"][n % 6]
    body = (
        f"To: {name.title()} <{name}@outside.example>\r\nSubject: offer\r\n\r\n"
        + text.format(name=name, n=n)
        + "\r\n"
    ).encode()
    ctx.message = Message(body)
    v = await pipeline.run(Stage.DATA, ctx)
    pipeline.finish(ctx, v.accepted)
    return v, ctx


async def test_thirty_recipient_copies_trip_at_the_fourth(monkeypatch):
    monkeypatch.setattr(bulk, "EXEMPTIONS", [])  # no confirmed list vouches here
    verdicts = [(await copy(n, 30))[0] for n in range(6)]
    assert [v.accepted for v in verdicts[:3]] == [True] * 3  # 3 * sqrt(30) = 16.4
    v = verdicts[3]  # 4 * sqrt(30) = 21.9 >= 20
    assert (v.code, v.status, v.rule, v.strike) == (550, "5.7.1", "bulk", True)
    assert "Breidbart index 21.9" in v.reason
    assert not verdicts[4].accepted  # and it stays refused


async def test_unrelated_messages_never_add_up():
    for n in range(10):
        v, _ = await copy(
            n,
            30,
            text=f"Personal note number {'xyz'[n % 3]} about {'abcdefghij'[n]} topics "
            + " ".join(f"word{c}" for c in "abcdefghij"[: n + 3]),
        )
    # different texts: each is its own campaign; only one copy of each
    assert (
        all(len(c.copies) == 1 for c in services.campaigns.customers["acme"].campaigns.values())
        or len(services.campaigns.customers["acme"].campaigns) > 1
    )


async def test_exemption_vouches_for_confirmed_list_mail():
    saved = list(bulk.EXEMPTIONS)
    bulk.EXEMPTIONS[:] = [lambda ctx: True]
    try:
        verdicts = [(await copy(n, 30))[0] for n in range(6)]
        assert all(v.accepted for v in verdicts)
    finally:
        bulk.EXEMPTIONS[:] = saved


async def test_unidentified_senders_are_not_scored():
    ctx = Context(
        config=CONFIG, session_id="T", client=Client(addr="203.0.113.9"), services=services
    )
    ctx.recipients = [parse_path("<x@hosted.example>")]
    ctx.message = Message(b"Subject: x\r\n\r\n" + TEXT.format(name="a", n=1).encode() + b"\r\n")
    assert await bulk.bulk(ctx) is None
