"""The opt-in rules run by the real pipeline, with a real OptinService on a SQLite store."""

from __future__ import annotations

import pytest

from maild.address import parse_path
from maild.antispam.campaigns import Campaigns
from maild.components import open_store
from maild.optin.model import Kind, State
from maild.optin.service import OptinService
from maild.optin.tokens import token_hash
from maild.policy import bulk, pipeline
from maild.policy.chain import CHAIN
from maild.policy.context import Client, Context, Identity, Message, Stage
from maild.policy.optin import vouch
from maild.policy.services import Services
from tests.optin.conftest import make_config

LIST = "news.acme.example"
RP = "news-bounces+x=y.example@lists.hosted.example"
CONFIG = make_config()
HEAD = (
    f"List-Id: Acme News <{LIST}>\nList-Unsubscribe: <mailto:news-leave@lists.hosted.example>"
    "\nSubject: March news\n"
)


@pytest.fixture
async def store(tmp_path):
    s = await open_store(str(tmp_path / "state.db"))
    yield s
    await s.close()


services = Services()  # the contexts' services: the svc fixture's opt-in service


@pytest.fixture
async def svc(store):
    s = OptinService(CONFIG, store, None)
    services.optin, services.campaigns, services.sanctions = s, None, None
    await s.start()
    yield s
    await s.stop()
    services.optin = services.campaigns = services.sanctions = None


async def seed(svc: OptinService, address: str, *kinds: Kind, list_id: str = LIST) -> None:
    for k in kinds:
        await svc.ledger.append(list_id=list_id, address=address, kind=k, channel="api")
    await svc.refresh()


def ctx_for(
    *,
    sender: str = f"<{RP}>",
    addr: str = "192.0.2.7",
    by: str = "network",
    customer: str | None = "acme",
) -> Context:
    ctx = Context(
        config=CONFIG, session_id="T", client=Client(addr=addr, name="c.example"), services=services
    )
    ctx.sender = parse_path(sender)
    if customer:
        ctx.identity = Identity(CONFIG.customer(customer), by)
    return ctx


async def rcpt(ctx: Context, address: str):
    ctx.rcpt = parse_path(f"<{address}>")
    v = await pipeline.run(Stage.RCPT, ctx)
    if v.accepted:
        ctx.recipients.append(ctx.rcpt)
        if ctx.postmaster_only is None:
            ctx.postmaster_only = v.rule == "postmaster"
    return v


async def data(ctx: Context, text: str):
    ctx.message = Message(text.replace("\n", "\r\n").encode())
    return await pipeline.run(Stage.DATA, ctx)


# ---------------------------------------------------------------------------- RCPT


async def test_rcpt_per_state(svc):
    await seed(svc, "ok@x.example", Kind.REQUEST, Kind.CONFIRM)
    await seed(svc, "pend@x.example", Kind.REQUEST)
    await seed(svc, "gone@x.example", Kind.OWNER_ADD, Kind.REVOKE)
    await seed(svc, "spam@x.example", Kind.OWNER_ADD, Kind.COMPLAINT)
    ctx = ctx_for()
    assert (await rcpt(ctx, "ok@x.example")).accepted
    for who, needle in (
        ("pend@x.example", "has not confirmed the subscription"),
        ("gone@x.example", "unsubscribed from list news.acme.example on"),
        ("spam@x.example", "suppressed on list news.acme.example since"),
        ("new@x.example", "is not a subscriber of list news.acme.example"),
    ):
        v = await rcpt(ctx, who)
        assert (v.code, v.status, v.rule, v.strike) == (550, "5.7.1", "optin-consent", False)
        assert v.reason.startswith(f"<{who}> ") and needle in v.reason, v.reason
    assert "after a spam complaint" in (await rcpt(ctx, "spam@x.example")).reason


async def test_rcpt_unjudged_without_a_list_return_path_or_proven_identity(svc):
    assert (await rcpt(ctx_for(sender="<ceo@acme.example>"), "new@x.example")).accepted
    # a sender domain proves nothing: no refusal (and no strike) on a forgeable identity
    ctx = ctx_for(addr="203.0.113.5", by="domain")
    assert (await rcpt(ctx, "new@hosted.example")).accepted
    # another customer using acme's return path is not acme's list mail
    assert (await rcpt(ctx_for(addr="198.51.100.1", customer="other"), "new@x.example")).accepted


async def test_postmaster_is_never_judged(svc):
    ctx = ctx_for()
    v = await rcpt(ctx, "postmaster@hosted.example")
    assert v.accepted and v.rule == "postmaster"
    v = await data(ctx, f"To: postmaster@hosted.example\n{HEAD}\nhello\n")
    assert v.accepted and v.rule == "postmaster"


async def test_confirm_address_checks_the_token(svc):
    ctx = ctx_for(sender="<bob@x.example>", addr="203.0.113.5", customer=None)
    v = await rcpt(ctx, f"confirm+{'a' * 32}@lists.hosted.example")
    assert (v.code, v.status, v.rule) == (550, "5.1.1", "optin-confirm")
    # a token the CLI issued a moment ago (not folded in yet) is found in the store
    await svc.ledger.append(
        list_id=LIST,
        address="bob@x.example",
        kind=Kind.REQUEST,
        channel="web",
        token_hash=token_hash("b" * 32),
        detail={"expires": "2999-01-01T00:00:00.000000Z"},
    )
    assert (await rcpt(ctx, f"confirm+{'B' * 32}@lists.hosted.example")).accepted
    await svc.ledger.append(
        list_id=LIST,
        address="old@x.example",
        kind=Kind.REQUEST,
        channel="web",
        token_hash=token_hash("c" * 32),
        detail={"expires": "2001-01-01T00:00:00.000000Z"},
    )
    v = await rcpt(ctx, f"confirm+{'c' * 32}@lists.hosted.example")
    assert (v.code, v.status) == (550, "5.7.1") and "expired on 2001-01-01 00:00 UTC" in v.reason


# ---------------------------------------------------------------------------- DATA


async def test_unregistered_list_is_a_strike(svc):
    ctx = ctx_for(sender="<promo@acme.example>")
    await rcpt(ctx, "x@outside.example")
    v = await data(ctx, "To: x@outside.example\nList-Id: <promo.acme.example>\nSubject: s\n\nhi\n")
    assert (v.code, v.status, v.rule, v.strike) == (550, "5.7.1", "optin-unregistered", True)
    assert "Unregistered mailing list" in v.reason and "List-Id <promo.acme.example>" in v.reason
    # another customer's registered List-Id is not acme's list either
    ctx = ctx_for(sender="<promo@acme.example>")
    await rcpt(ctx, "x@outside.example")
    v = await data(ctx, "To: x@outside.example\nList-Id: <deals.other.example>\n\nhi\n")
    assert v.rule == "optin-unregistered"


async def test_precedence_bulk_is_list_mail_but_not_on_an_auto_reply(svc):
    ctx = ctx_for(sender="<me@acme.example>")
    await rcpt(ctx, "x@outside.example")
    v = await data(ctx, "To: x@outside.example\nPrecedence: bulk\n\nhi\n")
    assert v.rule == "optin-unregistered" and "(Precedence: bulk)" in v.reason
    ctx = ctx_for(sender="<me@acme.example>")
    await rcpt(ctx, "x@outside.example")
    v = await data(
        ctx, "To: x@outside.example\nPrecedence: bulk\nAuto-Submitted: auto-replied\n\nI am away\n"
    )
    assert v.accepted


async def test_list_id_only_judges_every_recipient_at_end_of_data(svc):
    await seed(svc, "ok@x.example", Kind.OWNER_ADD)
    ctx = ctx_for(sender="<ceo@acme.example>")
    for a in ("ok@x.example", "pend@x.example"):
        assert (await rcpt(ctx, a)).accepted
    await seed(svc, "pend@x.example", Kind.REQUEST)
    v = await data(ctx, f"To: ok@x.example, pend@x.example\n{HEAD}\nhi\n")
    assert v.rule == "optin-consent" and "<pend@x.example> (pending)" in v.reason


async def test_good_list_mail_passes_and_is_counted(svc):
    await seed(svc, "ok@x.example", Kind.REQUEST, Kind.CONFIRM)
    ctx = ctx_for()
    await rcpt(ctx, "ok@x.example")
    v = await data(ctx, f"To: ok@x.example\n{HEAD}\nhello\n")
    assert v.accepted and ctx.notes["optin-deliver"] == LIST
    pipeline.finish(ctx, True)
    assert svc.complaint_rate(LIST)[1] == 1


@pytest.mark.parametrize(
    "head, to, body, needle, rule",
    [
        (
            "List-Id: <news.acme.example>\n",
            "ok@x.example",
            "hi",
            "must carry a List-Unsubscribe",
            "optin-unsubscribe",
        ),
        (
            "List-Unsubscribe: <https://acme.example/u/1>\n",
            "ok@x.example",
            "hi",
            "RFC 8058 requires exactly one",
            "optin-unsubscribe",
        ),
        (
            HEAD,
            "list@acme.example",
            "hi",
            "must name its recipient: <ok@x.example>",
            "optin-recipient",
        ),
    ],
)
async def test_per_message_rules(svc, head, to, body, needle, rule):
    await seed(svc, "ok@x.example", Kind.OWNER_ADD)
    ctx = ctx_for()
    await rcpt(ctx, "ok@x.example")
    v = await data(ctx, f"To: {to}\n{head}\n{body}\n")
    assert v.rule == rule and needle in v.reason and v.code == 550 and not v.strike


async def test_bcc_style_multi_recipient_list_mail(svc):
    await seed(svc, "a@x.example", Kind.OWNER_ADD)
    await seed(svc, "b@x.example", Kind.OWNER_ADD)
    ctx = ctx_for()
    await rcpt(ctx, "a@x.example")
    await rcpt(ctx, "b@x.example")
    v = await data(ctx, f"To: news@acme.example\n{HEAD}\nhi\n")
    assert v.rule == "optin-recipient" and "Bcc-style" in v.reason
    ctx = ctx_for()
    await rcpt(ctx, "a@x.example")
    await rcpt(ctx, "b@x.example")
    assert (await data(ctx, f"To: a@x.example, b@x.example\n{HEAD}\nhi\n")).accepted


async def test_bulk_rule_spares_a_registered_list_to_confirmed_subscribers(svc, monkeypatch):
    assert vouch in bulk.EXEMPTIONS
    services.campaigns = Campaigns()
    cfg = make_config()
    from dataclasses import replace

    cfg = replace(cfg, sections={**cfg.sections, "bulk": bulk.BulkConfig(threshold=1.0)})
    await seed(svc, "a@x.example", Kind.OWNER_ADD)
    await seed(svc, "b@x.example", Kind.OWNER_ADD)

    async def send(sender: str, list_head: str) -> tuple:
        ctx = ctx_for(sender=sender)
        ctx.config = cfg
        for a in ("a@x.example", "b@x.example"):
            await rcpt(ctx, a)
        v = await data(
            ctx,
            f"To: a@x.example, b@x.example\n{list_head}\n"
            "Our spring collection is here, with twenty new coats and hats.\n",
        )
        return v, ctx

    v, ctx = await send(f"<{RP}>", HEAD)
    assert v.accepted and ctx.notes["bulk-score"] >= 1.0
    v, ctx = await send("<shop@acme.example>", "Subject: spring\n")
    assert v.rule == "bulk" and "without opt-in evidence" in v.reason


# ---------------------------------------------------------------------------- finish


async def test_confirmation_reply_is_recorded_once_accepted(svc):
    await svc.ledger.append(
        list_id=LIST,
        address="bob@x.example",
        kind=Kind.REQUEST,
        channel="web",
        token_hash=token_hash("d" * 32),
        message_id="<c1@mx>",
        detail={"expires": "2999-01-01T00:00:00.000000Z"},
    )
    await svc.refresh()
    reply = (
        "From: Bob <bob@x.example>\nTo: confirm+" + "d" * 32 + "@lists.hosted.example\n"
        "Subject: Re: Please confirm\nIn-Reply-To: <c1@mx>\nMessage-ID: <r1@x.example>\n"
        "User-Agent: Mutt/2.2\n\nyes\n"
    )
    # refused downstream: nothing recorded
    ctx = ctx_for(sender="<bob@x.example>", addr="203.0.113.5", customer=None)
    await rcpt(ctx, f"confirm+{'d' * 32}@lists.hosted.example")
    assert (await data(ctx, reply)).accepted
    pipeline.finish(ctx, False)
    assert svc.standing(LIST, "bob@x.example").state is State.PENDING
    # accepted: confirmed at once, and in the ledger once the writer ran
    ctx = ctx_for(sender="<bob@x.example>", addr="203.0.113.5", customer=None)
    await rcpt(ctx, f"confirm+{'d' * 32}@lists.hosted.example")
    await data(ctx, reply)
    pipeline.finish(ctx, True)
    assert svc.standing(LIST, "bob@x.example").state is State.CONFIRMED
    await svc.queue.join()
    e = (await svc.ledger.events_for("bob@x.example"))[-1]
    assert (e.kind, e.channel, e.ip, e.user_agent, e.message_id) == (
        Kind.CONFIRM,
        "email",
        "203.0.113.5",
        "Mutt/2.2",
        "<r1@x.example>",
    )
    assert e.detail["confirmation_message_id"] == "<c1@mx>" and e.detail["from_is_subscriber"]
    assert (await svc.ledger.raw(e.raw_sha256)) == reply.replace("\n", "\r\n").encode()
    assert not svc.overlay  # the store now says it


async def test_automatic_reply_does_not_confirm(svc):
    await svc.ledger.append(
        list_id=LIST,
        address="bob@x.example",
        kind=Kind.REQUEST,
        channel="web",
        token_hash=token_hash("e" * 32),
        detail={"expires": "2999-01-01T00:00:00.000000Z"},
    )
    await svc.refresh()
    for sender, head in (
        ("<>", "Subject: Delivery report"),
        ("<bob@x.example>", "Auto-Submitted: auto-replied"),
    ):
        ctx = ctx_for(sender=sender, addr="203.0.113.5", customer=None)
        await rcpt(ctx, f"confirm+{'e' * 32}@lists.hosted.example")
        await data(ctx, f"From: bob@x.example\n{head}\n\naway\n")
        pipeline.finish(ctx, True)
    assert svc.standing(LIST, "bob@x.example").state is State.PENDING


async def test_mailto_unsubscribe_by_verp_address_and_by_sender(svc):
    await seed(svc, "bob@x.example", Kind.OWNER_ADD)
    await seed(svc, "amy@x.example", Kind.OWNER_ADD)
    ctx = ctx_for(sender="<whatever@forwarder.example>", addr="203.0.113.5", customer=None)
    await rcpt(ctx, "news-leave+bob=x.example@lists.hosted.example")
    await data(ctx, "From: someone@forwarder.example\nSubject: unsubscribe\n\n\n")
    pipeline.finish(ctx, True)
    assert svc.standing(LIST, "bob@x.example").state is State.REVOKED  # at once
    ctx = ctx_for(sender="<amy@x.example>", addr="203.0.113.5", customer=None)
    await rcpt(ctx, "news-leave@lists.hosted.example")
    await data(ctx, "From: Amy <amy@x.example>\nSubject: unsubscribe\n\n\n")
    pipeline.finish(ctx, True)
    await svc.queue.join()
    for a in ("bob@x.example", "amy@x.example"):
        e = (await svc.ledger.events_for(a))[-1]
        assert (e.kind, e.channel) == (Kind.REVOKE, "mailto") and e.raw_sha256


ARF = (
    "From: fbl@isp.example\nTo: abuse@hosted.example\nSubject: report\nMIME-Version: 1.0\n"
    'Content-Type: multipart/report; report-type=feedback-report; boundary="b"\n\n'
    "--b\nContent-Type: text/plain\n\nabuse report\n--b\n"
    "Content-Type: message/feedback-report\n\nFeedback-Type: abuse\nUser-Agent: FBL/1\n"
    "Version: 1\nOriginal-Mail-From: <news-bounces+carl=x.example@lists.hosted.example>\n\n"
    "--b\nContent-Type: text/rfc822-headers\n\nFrom: news@acme.example\nTo: carl@x.example\n"
    "List-Id: <news.acme.example>\n\n--b--\n"
)


async def test_arf_to_abuse_suppresses_and_the_rate_is_judged(svc, store, monkeypatch, caplog):
    from maild.antispam.sanctions import Sanctions

    sanctions = Sanctions(store, lambda: CONFIG)
    services.sanctions = svc.sanctions = sanctions
    await seed(svc, "carl@x.example", Kind.OWNER_ADD)
    svc.count_delivered(LIST, 50)  # under complaint_min_volume (100): the floor applies
    ctx = ctx_for(sender="<fbl@isp.example>", addr="203.0.113.5", customer=None)
    assert (await rcpt(ctx, "abuse@hosted.example")).rule == "postmaster"
    assert (await data(ctx, ARF)).rule == "postmaster"
    pipeline.finish(ctx, True)
    assert svc.standing(LIST, "carl@x.example").state is State.SUPPRESSED
    await svc.queue.join()
    await sanctions.drain()
    e = (await svc.ledger.events_for("carl@x.example"))[-1]
    assert (e.kind, e.channel, e.actor) == (Kind.COMPLAINT, "complaint", "FBL/1")
    assert svc.complaint_rate(LIST) == (1, 50, 1.0)  # 1 / max(50, 100)
    row = await store.fetchone("SELECT rule, reason FROM strikes WHERE customer = 'acme'")
    assert row[0] == "optin-complaints" and "1 complaint for 50 messages" in row[1]


async def test_complaint_under_the_limit_only_warns(svc, caplog):
    svc.count_delivered(LIST, 500)
    await seed(svc, "dora@x.example", Kind.OWNER_ADD, Kind.COMPLAINT)
    caplog.set_level("WARNING", logger="maild.optin")
    svc.judge_complaints(LIST)  # 1/500 = 0.2%: over the warning (0.1%), under the limit
    assert "action=warning" in caplog.text and "action=strike" not in caplog.text


DSN = (
    "From: MAILER-DAEMON@mx.x.example\nTo: news-bounces+dan=x.example@lists.hosted.example\n"
    "Subject: Undelivered\nMIME-Version: 1.0\nContent-Type: multipart/report; "
    'report-type=delivery-status; boundary="d"\n\n--d\nContent-Type: text/plain\n\nsorry\n'
    "--d\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.x.example\n\n"
    "Final-Recipient: rfc822; dan@x.example\nAction: failed\nStatus: 5.1.1\n\n--d--\n"
)


async def test_hard_bounce_to_the_return_path_suppresses(svc):
    await seed(svc, "dan@x.example", Kind.OWNER_ADD)
    ctx = ctx_for(sender="<>", addr="203.0.113.5", customer=None)
    await rcpt(ctx, "news-bounces+dan=x.example@lists.hosted.example")
    await data(ctx, DSN)
    pipeline.finish(ctx, True)
    assert svc.standing(LIST, "dan@x.example").state is State.SUPPRESSED
    await svc.queue.join()
    e = (await svc.ledger.events_for("dan@x.example"))[-1]
    assert e.kind is Kind.BOUNCE and e.detail["status"] == "5.1.1"


async def test_disabled_section_has_no_opinion(store, monkeypatch):
    cfg = make_config(enabled=False)
    s = OptinService(cfg, store, None)
    monkeypatch.setattr(services, "optin", s, raising=False)
    ctx = ctx_for()
    ctx.config = cfg
    assert (await rcpt(ctx, "new@x.example")).accepted


def test_rule_orders():
    names = [r.name for r in CHAIN[Stage.RCPT]]
    assert names.index("optin") > names.index("ratelimit")
    names = [r.name for r in CHAIN[Stage.DATA]]
    assert names.index("optin") > names.index("bulk")
