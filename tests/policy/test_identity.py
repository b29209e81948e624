"""Ownership, HELO, the null sender and its rate, and DNS failures as tempfails.

(The corpus in test_headers.py runs every check on whole messages; these tests pin the
pieces.) DNS is a real server on loopback.
"""

from __future__ import annotations

from email.utils import format_datetime, localtime

import pytest

from maild import dns as maild_dns
from maild.address import parse_path
from maild.antispam.limiter import Limiter, Rate
from maild.components import parse
from maild.policy import pipeline
from maild.policy.context import Client, Context, Identity, Message, Stage
from maild.policy.identity import helo_problem, lists_of, looks_automatic, owner_of
from maild.policy.services import Services
from maild.policy.verdict import Action
from tests.harness.dns import STANDARD_DROP, STANDARD_SERVFAIL, STANDARD_ZONE, DnsServer


@pytest.fixture(scope="module")
def dns_server():
    with DnsServer(STANDARD_ZONE, servfail=STANDARD_SERVFAIL, drop=STANDARD_DROP) as s:
        yield s


def make_config(dns_server, **headers):
    c = parse(
        {
            "server": {"hostname": "mx.hosted.example"},
            "postmaster": {
                "domains": ["hosted.example", "acme.example"],
                "hostnames": ["host.hosted.example"],
            },
            "customers": [
                {
                    "name": "acme",
                    "networks": ["192.0.2.0/24"],
                    "logins": ["alice"],
                    "domains": ["acme.example"],
                    "addresses": ["news@partner.example"],
                }
            ],
            "dns": {"nameservers": [dns_server.nameserver], "timeout": "500ms"},
            "headers": headers,
        }
    )
    maild_dns.configure(c)
    return c


@pytest.fixture
def config(dns_server):
    """The policy, with maild.dns pointed at the loopback server (as the daemon does)."""
    c = make_config(dns_server)
    maild_dns.configure(c)
    return c


def ctx_for(
    config,
    *,
    sender="<boss@acme.example>",
    helo="mail.acme.example",
    by="network",
    message: bytes | None = None,
    services: Services | None = None,
) -> Context:
    ctx = Context(
        config=config,
        session_id="T2",
        client=Client(addr="192.0.2.7", helo=helo),
        services=services or Services(),
    )
    ctx.identity = Identity(config.customer("acme"), by, "alice" if by == "login" else "")
    ctx.sender = parse_path(sender)
    if message is not None:
        ctx.message = Message(message)
    return ctx


# --------------------------------------------------------------------------- ownership


@pytest.mark.parametrize(
    "addr, where, why",
    [
        ("boss@acme.example", "from", "domain acme.example"),
        ("Boss@ACME.Example.", "from", "domain acme.example"),
        ("x@deep.mail.acme.example", "envelope", "domain acme.example"),
        ("news@partner.example", "reply-to", "address news@partner.example"),
        ("news+june@partner.example", "from", "address news@partner.example"),
        ("other@partner.example", "from", None),
        ("boss@notacme.example", "from", None),
        ("boss@acme.example.evil.example", "from", None),
        ("acme.example", "from", None),
        ("boss@", "from", None),
    ],
)
def test_owner_of(config, addr, where, why):
    assert owner_of(config.customer("acme"), addr, where) == why


async def test_envelope_owner_unqualified_and_literal_senders(config):
    for sender in ("<root>", "<boss@[192.0.2.7]>"):
        ctx = ctx_for(config, sender=sender)
        v = await pipeline.run(Stage.MAIL, ctx)
        assert (v.rule, v.code, v.status) == ("envelope-owner", 553, "5.7.1"), sender
        assert "has no domain name" in v.reason


# A list registered by acme on the provider's list domain, and one of another customer there.
LISTS = {
    "lists": [
        {
            "id": "news.acme.example",
            "customer": "acme",
            "owner": "news-owner@acme.example",
            "domain": "hosted.example",
            "return_paths": ["news-bounces+*@hosted.example"],
            "unsubscribe": ["news-leave@hosted.example", "news-leave+*@hosted.example"],
            "consent_text": "Acme News, monthly.",
        },
        {
            "id": "deals.other.example",
            "customer": "other",
            "owner": "deals@other.example",
            "domain": "hosted.example",
            "return_paths": ["deals-bounces@hosted.example"],
            "consent_text": "Deals, weekly.",
        },
    ]
}


def list_config(dns_server):
    c = parse(
        {
            "server": {"hostname": "mx.hosted.example"},
            "postmaster": {"domains": ["hosted.example", "acme.example"]},
            "customers": [
                {"name": "acme", "networks": ["192.0.2.0/24"], "domains": ["acme.example"]},
                {"name": "other", "networks": ["198.51.100.0/24"]},
            ],
            "dns": {"nameservers": [dns_server.nameserver], "timeout": "500ms"},
            "optin": LISTS,
        }
    )
    maild_dns.configure(c)
    return c


@pytest.mark.parametrize(
    "addr, acme, other",
    [
        (
            "news-bounces+bob=example.org@hosted.example",
            "return path of list news.acme.example",
            None,
        ),
        ("NEWS-bounces+x@Hosted.Example", "return path of list news.acme.example", None),
        ("news-leave@hosted.example", "unsubscribe address of list news.acme.example", None),
        (
            "news-leave+bob=example.org@hosted.example",
            "unsubscribe address of list news.acme.example",
            None,
        ),
        ("deals-bounces@hosted.example", None, "return path of list deals.other.example"),
        ("news-bounces@hosted.example", None, None),  # the pattern needs the '+'
        ("someone@hosted.example", None, None),
    ],
)
def test_a_registered_lists_addresses_are_its_customers_only(dns_server, addr, acme, other):
    """owner_of, the one lookup behind every ownership check, knows registered lists."""
    c = list_config(dns_server)
    assert owner_of(c.customer("acme"), addr, "envelope", lists_of(c)) == acme
    assert owner_of(c.customer("other"), addr, "from", lists_of(c)) == other


async def test_list_mail_from_its_return_path_passes_every_ownership_check(dns_server):
    c = list_config(dns_server)
    rp = "news-bounces+bob=example.org@hosted.example"
    msg = (
        f"From: Acme News <{rp}>\r\nSender: {rp}\r\nReply-To: news-leave@hosted.example"
        f"\r\nReturn-Path: <{rp}>\r\nTo: bob@example.org\r\nSubject: June\r\n"
        "Date: " + format_datetime(localtime()) + "\r\nMessage-ID: <j@acme.example>\r\n"
        "\r\nhello\r\n"
    ).encode()
    ctx = ctx_for(c, sender=f"<{rp}>")
    assert (await pipeline.run(Stage.MAIL, ctx)).accepted
    ctx = ctx_for(c, sender=f"<{rp}>", message=msg)
    v = await pipeline.run(Stage.DATA, ctx)
    assert not (v.rule or "").endswith("-owner"), v.reason
    # the other customer, from the same network range of its own, is refused and struck
    ctx = ctx_for(c, sender=f"<{rp}>")
    ctx.identity = Identity(c.customer("other"), "network", "")
    v = await pipeline.run(Stage.MAIL, ctx)
    assert (v.rule, v.code, v.status, v.strike) == ("envelope-owner", 553, "5.7.1", True)


# --------------------------------------------------------------------------- HELO


@pytest.mark.parametrize(
    "helo, client, ok",
    [
        ("mail.acme.example", "192.0.2.7", True),
        ("mail.acme.example.", "192.0.2.7", True),
        ("[192.0.2.7]", "192.0.2.7", True),
        ("[192.0.2.7]", "::ffff:192.0.2.7", True),
        ("[IPv6:2001:db8::7]", "2001:db8::7", True),
        ("[IPv6:2001:db8::8]", "2001:db8::7", False),
        ("[10.0.0.5]", "192.0.2.7", False),
        ("[not-an-ip]", "192.0.2.7", False),
        ("192.0.2.7", "192.0.2.7", False),
        ("localhost", "192.0.2.7", False),
        ("DESKTOP-7QX", "192.0.2.7", False),
        ("bad_name.acme.example", "192.0.2.7", False),
        ("host.123", "192.0.2.7", False),
        ("", "192.0.2.7", False),
    ],
)
def test_helo_problem(helo, client, ok):
    assert (helo_problem(helo, client) is None) == ok


async def test_helo_of_a_login_is_not_judged_unless_configured(dns_server):
    conf = make_config(dns_server)
    assert (await pipeline.run(Stage.MAIL, ctx_for(conf, helo="DESKTOP-7QX", by="login"))).accepted
    conf = make_config(dns_server, helo_for_logins=True)
    v = await pipeline.run(Stage.MAIL, ctx_for(conf, helo="DESKTOP-7QX", by="login"))
    assert (v.rule, v.code, v.status) == ("helo-invalid", 550, "5.5.2")


async def test_helo_ours_but_a_hosted_customer_may_name_its_own_domain(config):
    v = await pipeline.run(Stage.MAIL, ctx_for(config, helo="host.hosted.example"))
    assert (v.rule, v.code, v.status) == ("helo-ours", 550, "5.7.1")
    v = await pipeline.run(Stage.MAIL, ctx_for(config, helo="HOSTED.example"))
    assert v.rule == "helo-ours"
    # acme.example is hosted here (in [postmaster] domains) and is acme's own
    assert (await pipeline.run(Stage.MAIL, ctx_for(config, helo="acme.example"))).accepted


# --------------------------------------------------------------------------- DNS failures


async def test_dns_timeout_is_a_451_tempfail_never_a_reject(config):
    ctx = ctx_for(config, sender="<x@timeout.acme.example>")
    v = await pipeline.run(Stage.MAIL, ctx)
    assert (v.action, v.code, v.status, v.rule) == (
        Action.TEMPFAIL,
        451,
        "4.4.3",
        "sender-domain-unknown",
    )
    assert "timeout after 0.5s" in v.reason and not v.strike


async def test_dns_failure_in_tag_mode_is_a_tag(dns_server):
    conf = make_config(dns_server, mode="tag")
    ctx = ctx_for(conf, sender="<x@servfail.acme.example>")
    assert (await pipeline.run(Stage.MAIL, ctx)).accepted
    assert ctx.add_headers[0][1].startswith("rule=sender-domain-unknown result=fail")


async def test_nullmx_sender_is_5_7_27(config):
    v = await pipeline.run(Stage.MAIL, ctx_for(config, sender="<x@nullmx.acme.example>"))
    assert (v.code, v.status, v.rule) == (550, "5.7.27", "sender-domain-unknown")


async def test_a_domain_hosted_here_needs_no_dns(dns_server):
    """As Postfix's reject_unknown_sender_domain, which skips domains it is the final
    destination for: mail to a [postmaster] domain comes here, so replies reach it. Its
    subdomains are looked up as any other name (a resolver that answers nothing: 451)."""
    c = parse(
        {
            "server": {"hostname": "mail.try.example"},
            "postmaster": {"domains": ["try.example"], "hostnames": ["mail.try.example"]},
            "customers": [
                {"name": "acme", "networks": ["192.0.2.0/24"], "domains": ["try.example"]}
            ],
            "dns": {"nameservers": [dns_server.nameserver], "timeout": "500ms"},
        }
    )
    maild_dns.configure(c)
    maild_dns.cache_clear()
    asked = len(dns_server.queries)
    msg = (
        b"From: You <you@Try.Example>\r\nTo: friend@outside.example\r\nSubject: hi\r\n"
        b"Date: " + format_datetime(localtime()).encode() + b"\r\n"
        b"Message-ID: <1@try.example>\r\n\r\nhello\r\n"
    )
    for sender in ("<you@try.example>", "<you@mail.try.example>"):
        assert (await pipeline.run(Stage.MAIL, ctx_for(c, sender=sender))).accepted, sender
    v = await pipeline.run(Stage.DATA, ctx_for(c, sender="<you@try.example>", message=msg))
    assert v.accepted, v.reason
    assert len(dns_server.queries) == asked  # nothing was looked up
    v = await pipeline.run(Stage.MAIL, ctx_for(c, sender="<you@sub.try.example>"))
    assert (v.rule, v.code) == ("sender-domain-unknown", 550), v.reason  # NXDOMAIN here


# --------------------------------------------------------------------------- null sender

BOUNCE = (
    b"From: MAILER-DAEMON@mail.acme.example\r\nSubject: Undelivered Mail\r\n"
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n"
)


@pytest.mark.parametrize(
    "head, auto",
    [
        (b"Content-Type: multipart/report; report-type=disposition-notification\r\n", True),
        (b"Auto-Submitted: auto-replied\r\n", True),
        (b"Auto-Submitted: auto-generated (vacation)\r\n", True),
        (b"Auto-Submitted: no\r\nSubject: hello\r\n", False),
        (b"X-Autoreply: yes\r\n", True),
        (b"Precedence: auto_reply\r\n", True),
        (b"From: Mail Delivery Subsystem <mailer-daemon@acme.example>\r\n", True),
        (b"Subject: Automatic reply: figures\r\n", True),
        (b"Subject: Out of Office: figures\r\n", True),
        (b"Subject: Delivery Status Notification (Failure)\r\n", True),
        (b"Subject: June offers\r\nPrecedence: bulk\r\n", False),
        (b"From: news@acme.example\r\nSubject: Re: undelivered parcel\r\n", False),
    ],
)
def test_looks_automatic(config, head, auto):
    ctx = ctx_for(config, sender="<>", message=head + b"\r\nbody\r\n")
    assert looks_automatic(ctx) == auto


async def test_null_sender_rate_counts_only_delivered_messages(dns_server):
    services = Services(limiter=Limiter(clock=lambda: 1e9))
    conf = make_config(dns_server, null_sender_rate="2/1h")

    async def bounce(delivered: bool = True, date: str = "") -> object:
        ctx = ctx_for(
            conf,
            sender="<>",
            services=services,
            message=BOUNCE.replace(
                b"\r\n\r\n", f"\r\nDate: {date or format_datetime(localtime())}\r\n\r\n".encode()
            ),
        )
        v = await pipeline.run(Stage.DATA, ctx)
        pipeline.finish(ctx, accepted=delivered and v.accepted)
        return v

    # refused by an earlier check (a Date far ahead): never reaches the rate, not charged
    assert (await bounce(date="Mon, 3 Jun 2099 10:00:00 +0000")).rule == "date-future"
    assert (await bounce(delivered=False)).accepted  # refused downstream: released
    assert services.limiter.value("null-sender:acme", Rate.parse("2/1h")) == 0.0
    assert (await bounce()).accepted
    assert (await bounce()).accepted
    v = await bounce()
    assert (v.action, v.code, v.status, v.rule) == (
        Action.TEMPFAIL,
        451,
        "4.7.1",
        "null-sender-rate",
    )
    assert "limit 2/1h" in v.reason and "try again in" in v.reason
    assert services.limiter.value("null-sender:acme", Rate.parse("2/1h")) == 2.0


async def test_plain_mail_with_the_null_sender_is_refused(config):
    ctx = ctx_for(
        config,
        sender="<>",
        message=b"From: boss@acme.example\r\nSubject: offers\r\n"
        b"Date: Mon, 3 Jun 2024 10:00:00 +0000\r\nMessage-ID: <a@acme.example>\r\n\r\nx\r\n",
    )
    v = await pipeline.run(Stage.DATA, ctx)
    assert (v.rule, v.code, v.status, v.strike) == ("null-sender", 550, "5.7.1", True)
