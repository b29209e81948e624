"""The proxy handler against a fake downstream: what the client hears, what is logged,
and what reaches the downstream (nothing after a refusal; 451 when the downstream fails).

The fake implements the downstream's interface (acquire, command, pipeline, data,
release) and records every line; the SMTP server is not involved: the handler's hooks
are called as aiosmtpd calls them.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest

from maild.address import parse_path
from maild.antispam.limiter import Limiter, Rate
from maild.components import parse
from maild.policy.ratelimit import customer_key
from maild.policy.services import Services
from maild.smtp.budget import Budget
from maild.smtp.data import Abort, AbortKind
from maild.smtp.downstream import DownstreamBusy, DownstreamError, Reply
from maild.smtp.proxy import TEMPFAIL_DOWNSTREAM, Proxy
from maild.smtp.server import MaildEnvelope, MaildSession
from maild.store.core import DecisionRow

CONFIG = parse(
    {
        "server": {"hostname": "mx.hosted.example", "downstream": "127.0.0.1:10026"},
        "postmaster": {"domains": ["hosted.example"]},
        "headers": {"checks": {"sender-domain-unknown": "off", "from-domain-unknown": "off"}},
        "customers": [{"name": "acme", "networks": ["192.0.2.0/24"], "domains": ["acme.example"]}],
    }
)
MESSAGE = (
    b"From: Ann <ann@acme.example>\r\nTo: bob@outside.example\r\n"
    b"Date: Mon, 3 Jun 2024 10:00:00 +0000\r\nMessage-ID: <1@acme.example>\r\n"
    b"Subject: hello\r\n\r\nhi\r\n"
)


@dataclass
class FakeConn:
    xforward: frozenset[str] = frozenset()
    pipelining: bool = True
    content_sent: bool = False


@dataclass
class FakeDownstream:
    """Answers 250 to everything unless told otherwise; records what it was sent."""

    host: str = "127.0.0.1"
    port: int = 10026
    timeout: float = 5.0
    sent: list[str] = field(default_factory=list)
    released: list[bool] = field(default_factory=list)
    replies: dict[str, Reply] = field(default_factory=dict)  # command word -> reply
    fail: set[str] = field(default_factory=set)  # "acquire", "DATA", ...: DownstreamError
    xforward: frozenset[str] = frozenset()
    acquired: list[tuple[str, bool]] = field(default_factory=list)  # (holder, reserved)
    data_delay: float = 0.0  # seconds the final dot's reply takes

    async def acquire(self, holder: str = "", *, reserved: bool = True) -> tuple[FakeConn, bool]:
        if "acquire" in self.fail:
            raise DownstreamError("connection refused")
        if "busy" in self.fail:
            raise DownstreamBusy(
                "Too many messages in transit to our mail server right now",
                "downstream-connections",
            )
        self.acquired.append((holder, reserved))
        return FakeConn(self.xforward), False

    def _reply(self, line: str) -> Reply:
        word = line.split(":")[0].split()[0]
        if word in self.fail:
            raise DownstreamError(f"lost at {word}")
        self.sent.append(line)
        return self.replies.get(word, Reply(250, "2.1.0 Ok"))

    async def command(self, conn: FakeConn, line: str, timeout: float | None = None) -> Reply:
        return self._reply(line)

    async def pipeline(
        self, conn: FakeConn, lines: list[str], timeout: float | None = None
    ) -> list[Reply]:
        return [self._reply(line) for line in lines]

    async def data(
        self,
        conn: FakeConn,
        message: bytes,
        timeout: float | None = None,
        *,
        rest: Iterable[bytes] = (),
        rest_size: int = 0,
    ) -> Reply:
        self._reply("DATA")  # raises when told to fail
        conn.content_sent = True
        await asyncio.sleep(self.data_delay)
        self.sent[-1] = (message + b"".join(rest)).decode()
        return self.replies.get("DATA", Reply(250, "2.0.0 Ok: queued as 4XyZ"))

    def release(self, conn: FakeConn, *, reusable: bool) -> None:
        self.released.append(reusable)


class Decisions:
    def __init__(self) -> None:
        self.rows: list[DecisionRow] = []

    def add(self, row: DecisionRow) -> None:
        self.rows.append(row)

    def last(self) -> tuple[str, str, str, int]:
        r = self.rows[-1]
        return r.stage, r.action, r.rule, r.code


class Strikes:
    def __init__(self) -> None:
        self.strikes: list[tuple[str, str]] = []
        self.blocked: dict[str, object] = {}

    def strike_soon(self, customer: str, rule: str, reason: str, **kw: object) -> None:
        self.strikes.append((customer, rule))


@pytest.fixture
def down() -> FakeDownstream:
    return FakeDownstream()


@pytest.fixture
def decisions() -> Decisions:
    return Decisions()


@pytest.fixture
def sanctions() -> Strikes:
    return Strikes()


@pytest.fixture
def proxy(down, decisions, sanctions) -> Proxy:
    return Proxy(CONFIG, down, decisions, Services(sanctions=sanctions))  # type: ignore[arg-type]


async def session(
    proxy: Proxy, addr: str = "192.0.2.7", helo: str = "mail.acme.example"
) -> tuple[MaildSession, MaildEnvelope]:
    s = MaildSession(asyncio.get_running_loop())
    s.client.addr = addr
    await proxy.handle_EHLO(None, s, None, helo, ["250-mx.hosted.example", "250 HELP"])
    return s, MaildEnvelope()


async def mail(proxy: Proxy, s: MaildSession, e: MaildEnvelope, sender: str) -> str:
    return await proxy.handle_MAIL(None, s, e, parse_path(sender), [])


async def rcpt(proxy: Proxy, s: MaildSession, e: MaildEnvelope, to: str) -> str:
    return await proxy.handle_RCPT(None, s, e, parse_path(to), [])


async def data(
    proxy: Proxy,
    s: MaildSession,
    e: MaildEnvelope,
    content: bytes = MESSAGE,
    budget: Budget | None = None,
) -> str:
    """End of data, the content read as the server reads it (into a budget's sink)."""
    sink = (budget or Budget(1 << 20, 1 << 16, tempfile.gettempdir())).sink()
    sink.extend(content)
    e.original_content = sink.finish()  # type: ignore[assignment]
    return await proxy.handle_DATA(None, s, e)


async def test_a_message_is_relayed_and_answered_with_the_downstreams_reply(proxy, down, decisions):
    s, e = await session(proxy)
    assert await mail(proxy, s, e, "<ann@acme.example>") == "250 2.1.0 Ok"
    assert down.sent == [] and s.conn is None  # nothing downstream before a recipient
    assert await rcpt(proxy, s, e, "<bob@outside.example>") == "250 2.1.0 Ok"
    assert down.acquired == [("192.0.2.7", True)]  # a customer: the reserved share
    assert await data(proxy, s, e) == "250 2.0.0 Ok: queued as 4XyZ"
    assert down.sent[:2] == ["MAIL FROM:<ann@acme.example>", "RCPT TO:<bob@outside.example>"]
    relayed = down.sent[2]
    assert relayed.startswith("Received: from mail.acme.example (unknown [192.0.2.7])")
    assert "X-Maild-Customer: acme" in relayed and relayed.endswith(MESSAGE.decode())
    assert decisions.last() == ("DATA", "relay", "-", 250)
    assert down.released == [True] and s.conn is None and s.ctx is None
    assert proxy.stats["relayed"] == 1


async def test_nothing_is_relayed_after_a_refused_recipient(proxy, down, decisions):
    s, e = await session(proxy, addr="198.51.100.9", helo="stranger.example")
    await mail(proxy, s, e, "<x@stranger.example>")
    reply = await rcpt(proxy, s, e, "<bob@outside.example>")
    assert reply.startswith("554 5.7.1 <bob@outside.example>: Relay access denied")
    assert down.sent == [] and down.acquired == []  # no downstream connection at all
    assert decisions.last() == ("RCPT", "reject", "relay", 554)
    assert e.rcpt_tos == []


async def test_a_refused_message_is_not_relayed_and_strikes_when_forged(
    proxy, down, decisions, sanctions
):
    s, e = await session(proxy)
    await mail(proxy, s, e, "<ann@acme.example>")
    await rcpt(proxy, s, e, "<bob@outside.example>")
    forged = MESSAGE.replace(b"From: Ann <ann@acme.example>", b"From: boss@bank.example")
    reply = await data(proxy, s, e, forged)
    assert reply.startswith("550 5.7.1 ") and reply.endswith("(from-owner)")
    await asyncio.sleep(0)  # the transaction's RSET, sent in the background
    assert down.sent == ["MAIL FROM:<ann@acme.example>", "RCPT TO:<bob@outside.example>", "RSET"]
    assert decisions.last() == ("DATA", "reject", "from-owner", 550)
    assert sanctions.strikes == [("acme", "from-owner")]


async def test_a_malformed_message_is_refused_without_a_strike(proxy, down, sanctions):
    s, e = await session(proxy)
    await mail(proxy, s, e, "<ann@acme.example>")
    await rcpt(proxy, s, e, "<bob@outside.example>")
    reply = await data(
        proxy, s, e, MESSAGE.replace(b"Date: Mon, 3 Jun 2024 10:00:00 +0000\r\n", b"")
    )
    assert reply.startswith("550 5.6.0 ") and reply.endswith("(date-missing)")
    assert sanctions.strikes == []


async def test_downstream_unreachable_is_451_at_the_first_recipient(proxy, down, decisions):
    down.fail.add("acquire")
    s, e = await session(proxy)
    assert await mail(proxy, s, e, "<ann@acme.example>") == "250 2.1.0 Ok"
    assert await rcpt(proxy, s, e, "<bob@outside.example>") == TEMPFAIL_DOWNSTREAM
    assert decisions.last() == ("RCPT", "tempfail", "downstream", 451)
    assert down.sent == [] and e.rcpt_tos == [] and s.ctx is not None
    assert s.ctx.recipients == []


async def test_a_full_downstream_pool_is_451_4_4_5_with_the_reason_once_a_minute(
    proxy, down, decisions
):
    down.fail.add("busy")
    s, e = await session(proxy, addr="198.51.100.9", helo="stranger.example")
    await mail(proxy, s, e, "<x@stranger.example>")
    for _ in range(3):
        reply = await rcpt(proxy, s, e, "<bob@hosted.example>")
        assert reply == (
            "451 4.4.5 Too many messages in transit to our mail server right now; try again later"
        )
    assert [r.rule for r in decisions.rows] == ["downstream-connections"]
    assert e.rcpt_tos == [] and s.conn is None


async def test_postmaster_mail_from_a_stranger_uses_the_reserved_share(proxy, down):
    s, e = await session(proxy, addr="198.51.100.9", helo="stranger.example")
    await mail(proxy, s, e, "<x@stranger.example>")
    await rcpt(proxy, s, e, "<postmaster@hosted.example>")
    s2, e2 = await session(proxy, addr="198.51.100.9", helo="stranger.example")
    await mail(proxy, s2, e2, "<x@stranger.example>")
    await rcpt(proxy, s2, e2, "<bob@hosted.example>")
    assert down.acquired == [("198.51.100.9", True), ("198.51.100.9", False)]


async def test_a_downstream_refusing_mail_from_is_heard_at_rcpt(proxy, down, decisions):
    down.replies["MAIL"] = Reply(553, "5.1.7 <x@stranger.example>: Sender address rejected")
    s, e = await session(proxy, addr="198.51.100.9", helo="stranger.example")
    assert await mail(proxy, s, e, "<x@stranger.example>") == "250 2.1.0 Ok"
    reply = await rcpt(proxy, s, e, "<bob@hosted.example>")
    assert reply == "553 5.1.7 <x@stranger.example>: Sender address rejected"
    assert decisions.last() == ("RCPT", "reject", "downstream", 553)
    assert down.released == [True]  # a clean refusal: the connection stays usable
    assert s.conn is None and e.rcpt_tos == []


async def test_downstream_lost_during_data_is_451_and_nothing_is_counted(proxy, down, decisions):
    down.fail.add("DATA")
    s, e = await session(proxy)
    await mail(proxy, s, e, "<ann@acme.example>")
    await rcpt(proxy, s, e, "<bob@outside.example>")
    ctx = s.ctx
    assert await data(proxy, s, e) == TEMPFAIL_DOWNSTREAM
    assert decisions.last() == ("DATA", "tempfail", "downstream", 451)
    assert ctx is not None and ctx.finished and down.released == [False]
    assert proxy.stats["relayed"] == 0


async def test_the_downstreams_refusal_reaches_the_client_per_recipient(proxy, down, decisions):
    down.replies["RCPT"] = Reply(550, "5.1.1 <nobody@hosted.example>: Recipient address rejected")
    s, e = await session(proxy)
    await mail(proxy, s, e, "<ann@acme.example>")
    reply = await rcpt(proxy, s, e, "<nobody@hosted.example>")
    assert reply == "550 5.1.1 <nobody@hosted.example>: Recipient address rejected"
    assert decisions.last() == ("RCPT", "reject", "downstream", 550)
    assert s.ctx is not None and s.ctx.recipients == [] and e.rcpt_tos == []


async def test_postmaster_first_keeps_the_transaction_postmaster_only(proxy, down):
    s, e = await session(proxy, addr="198.51.100.9", helo="stranger.example")
    await mail(proxy, s, e, "<x@stranger.example>")
    assert await rcpt(proxy, s, e, "<postmaster@hosted.example>") == "250 2.1.0 Ok"
    assert s.ctx is not None and s.ctx.postmaster_only is True
    reply = await rcpt(proxy, s, e, "<bob@hosted.example>")
    assert reply.startswith("452 4.5.3 <bob@hosted.example>: send mail to other recipients")


async def test_a_data_abort_is_logged_by_its_kind_and_nothing_is_relayed(proxy, down, decisions):
    s, e = await session(proxy)
    await mail(proxy, s, e, "<ann@acme.example>")
    await rcpt(proxy, s, e, "<bob@outside.example>")
    proxy.data_aborted(s, Abort(AbortKind.BARE_LINE_ENDING, "550 5.5.2 Message refused"))
    assert decisions.last() == ("DATA", "reject", "smuggling", 550)
    proxy.data_aborted(s, Abort(AbortKind.SIZE, "552 5.3.4 Message size exceeds fixed limit"))
    assert decisions.last() == ("DATA", "reject", "limits", 552)
    await asyncio.sleep(0)
    assert not any(line.startswith("Received:") for line in down.sent)
    assert s.conn is None and s.ctx is None


async def test_xforward_is_sent_before_mail_when_the_downstream_accepts_it(proxy, down):
    down.xforward = frozenset({"NAME", "ADDR", "HELO"})
    s, e = await session(proxy)
    await mail(proxy, s, e, "<ann@acme.example>")
    await rcpt(proxy, s, e, "<bob@outside.example>")
    assert down.sent == [
        "XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.7 HELO=mail.acme.example",
        "MAIL FROM:<ann@acme.example>",
        "RCPT TO:<bob@outside.example>",
    ]


async def test_a_spooled_message_is_relayed_whole_and_its_spool_freed_on_every_path(
    proxy, down, decisions, tmp_path
):
    budget = Budget(1 << 20, 4096, str(tmp_path))
    body = b"".join(b"line %06d of a long report\r\n" % i for i in range(2000))
    s, e = await session(proxy)
    await mail(proxy, s, e, "<ann@acme.example>")
    await rcpt(proxy, s, e, "<bob@outside.example>")
    assert await data(proxy, s, e, MESSAGE + body, budget) == "250 2.0.0 Ok: queued as 4XyZ"
    assert budget.spooled == 1 and budget.spooling == 0 and budget.in_use == 0
    assert down.sent[-1].endswith((MESSAGE + body).decode())
    assert decisions.rows[-1].size == len(MESSAGE + body)
    # refused at end of data: the spool file goes too
    await mail(proxy, s, e, "<ann@acme.example>")
    await rcpt(proxy, s, e, "<bob@outside.example>")
    forged = MESSAGE.replace(b"From: Ann <ann@acme.example>", b"From: boss@bank.example")
    assert (await data(proxy, s, e, forged + body, budget)).startswith("550 5.7.1 ")
    assert budget.spooled == 2 and budget.spooling == 0 and budget.in_use == 0


async def test_a_retry_answered_from_a_late_accept_is_charged_once(down, decisions, sanctions):
    """The first attempt heard 451 (the downstream's 250 came late) and charged nothing;
    the retry is answered 250 without a second copy, and that message is counted."""
    limiter = Limiter(clock=lambda: 1e9)
    proxy = Proxy(CONFIG, down, decisions, Services(sanctions=sanctions, limiter=limiter))  # type: ignore[arg-type]
    down.timeout, down.data_delay = 0.01, 0.05
    messages = customer_key("messages", "acme")
    hour = Rate.parse("200/1h")
    for attempt in ("first", "retry"):
        s, e = await session(proxy)
        assert (await mail(proxy, s, e, "<ann@acme.example>")).startswith("250")
        assert (await rcpt(proxy, s, e, "<bob@outside.example>")).startswith("250")
        reply = await data(proxy, s, e)
        if attempt == "first":
            assert reply.startswith("451"), reply
            assert limiter.value(messages, hour) == 0
            while not proxy.late.accepted:  # the late 250 arrives
                await asyncio.sleep(0.01)
        else:
            assert "accepted earlier" in reply, reply
    assert sum("Subject: hello" in x for x in down.sent) == 1  # relayed once
    assert limiter.value(messages, hour) == 1
