"""Mail that changes consent, recorded once Postfix accepted it.

* a reply to (or any mail to) confirm+TOKEN@<list domain>: the subscriber's
  confirmation, kept with all its headers; automatic replies (null sender,
  Auto-Submitted, Precedence: bulk/junk/list) prove nothing and are ignored;
* mail to a list's unsubscribe address (the List-Unsubscribe mailto): a revocation of
  the address encoded in a VERP unsubscribe address, else of the From: and envelope
  sender addresses that are subscribers; the subscriber is told once;
* an ARF report (RFC 5965) to a complaint address (abuse@ by default): the recipient
  it maps to is suppressed, and the list's complaint rate is judged;
* a DSN to a list's return path: an address failure (5.1.x, 5.2.1) suppresses it.
"""

from __future__ import annotations

import email.utils
import logging
import re

from maild.log import clean
from maild.optin import messages
from maild.optin.actions import send_notice
from maild.optin.detect import automatic
from maild.optin.model import GONE, Event, Kind, State, iso
from maild.optin.registry import MailingList, Registry, compile_pattern, verp_decode
from maild.optin.reports import (
    COMPLAINT_TYPES,
    Complaint,
    address_failure,
    parse_arf,
    parse_dsn,
)
from maild.optin.service import OptinService
from maild.optin.settings import section
from maild.optin.tokens import short, token_hash
from maild.policy.context import Context

log = logging.getLogger("maild.optin")


def _from_addresses(ctx: Context) -> list[str]:
    assert ctx.message is not None
    h = ctx.message.headers
    return [
        a.lower()
        for _, a in email.utils.getaddresses([str(v) for v in h.get_all("From", [])])
        if "@" in a
    ]


def _user_agent(ctx: Context) -> str:
    assert ctx.message is not None
    h = ctx.message.headers
    return " ".join(str(h.get("User-Agent") or h.get("X-Mailer") or "").split())[:300]


def _common(ctx: Context) -> dict[str, object]:
    """Where the mail came from: the SMTP client, as Postfix would log it."""
    assert ctx.message is not None
    h = ctx.message.headers
    return {
        "client": ctx.client.label,
        "helo": ctx.client.helo[:255],
        "envelope_from": ctx.sender.addr if ctx.sender else "",
        "from": ", ".join(_from_addresses(ctx))[:300],
        "session": ctx.session_id,
        "subject": " ".join(str(h.get("Subject", "")).split())[:200],
    }


def on_accepted(svc: OptinService, ctx: Context) -> None:
    """Called from the finish hook for every transaction Postfix accepted."""
    if ctx.message is None:
        return
    reg = svc.registry(ctx.config)
    s = section(ctx.config)
    null = ctx.sender is None or ctx.sender.is_null
    complaint_patterns = [compile_pattern(p) for p in s.complaint_addresses]
    complaint_done = bounce_done = False
    for rcpt in ctx.recipients:
        token = reg.confirm_token(rcpt.local, rcpt.domain, s.confirm_local_part)
        if token is not None:
            confirm(svc, ctx, token)
            continue
        hit = reg.for_unsubscribe(rcpt.addr)
        if hit is not None:
            unsubscribe(svc, ctx, *hit)
            continue
        if (
            not complaint_done
            and rcpt.domain in ctx.hosted
            and any(p.fullmatch(rcpt.addr.lower()) for p in complaint_patterns)
        ):
            complaint_done = complaint(svc, ctx, reg)
            continue
        if null and not bounce_done:
            rp = reg.any_return_path(rcpt.addr)
            if rp is not None:
                bounce_done = bounce(svc, ctx, *rp)


def confirm(svc: OptinService, ctx: Context, token: str) -> None:
    assert ctx.message is not None
    th = token_hash(token)
    t = svc.tokens.get(th)
    now = svc.clock()
    if t is None or t.used or t.expires < now:
        return  # refused at RCPT; a token used meanwhile by a parallel reply: nothing to add
    lst = svc.registry(ctx.config).get(t.list_id)
    h = ctx.message.headers
    why = automatic(h, ctx.sender is None or ctx.sender.is_null)
    if why:
        log.warning(
            'optin: list=%s address=%s event=ignored reason="automatic reply: %s" '
            "token_hash=%s client=%s",
            t.list_id,
            t.address,
            clean(why),
            short(th),
            clean(ctx.client.label),
        )
        return
    t.used = True
    froms = _from_addresses(ctx)
    detail = {
        **_common(ctx),
        "request_seq": t.request_seq,
        "confirmation_message_id": t.message_id,
        "in_reply_to": " ".join(str(h.get("In-Reply-To", "")).split())[:300],
        "from_is_subscriber": t.address in froms,
    }
    svc.record(
        f"confirm of {t.address} on {t.list_id}",
        [
            dict(
                list_id=t.list_id,
                address=t.address,
                kind=Kind.CONFIRM,
                channel="email",
                actor=froms[0] if froms else (ctx.sender.addr if ctx.sender else ""),
                ip=ctx.client.addr,
                user_agent=_user_agent(ctx),
                consent_hash=t.consent_hash or (lst.cfg.consent_hash if lst else ""),
                token_hash=th,
                message_id=str(h.get("Message-ID", "")).strip(),
                raw=ctx.message.content,
                detail=detail,
            )
        ],
    )


def unsubscribe(svc: OptinService, ctx: Context, lst: MailingList, m: re.Match[str]) -> None:
    """mailto: unsubscribe: whom it is for, from the VERP address or the sender."""
    assert ctx.message is not None
    encoded = verp_decode(m.group(1)) if m.groups() else None
    if encoded:
        candidates = [encoded]
    else:
        candidates = _from_addresses(ctx)
        if ctx.sender is not None and not ctx.sender.is_null:
            candidates.append(ctx.sender.addr.lower())
    candidates = list(dict.fromkeys(candidates))
    targets = []
    for a in candidates:
        st = svc.standing(lst.id, a, ctx.config)
        if st.state in (State.CONFIRMED, State.PENDING):
            targets.append((a, st))
    if not targets:
        log.warning(
            'optin: list=%s event=ignored reason="unsubscribe from a non-subscriber" '
            "candidates=%s client=%s",
            lst.id,
            clean(",".join(candidates), 200),
            clean(ctx.client.label),
        )
        return
    events = []
    notify = section(ctx.config).notify_revocation and svc.downstream is not None
    notices = {}
    for a, st in targets:
        detail = {**_common(ctx), "previous_state": str(st.state)}
        if notify:
            notices[a] = messages.revocation_notice(
                lst.cfg,
                a,
                channel="mailto",
                when=iso(svc.clock())[:19],
                hostname=ctx.config.server.hostname,
            )
            detail["notice_message_id"] = notices[a][1]
        events.append(
            dict(
                list_id=lst.id,
                address=a,
                kind=Kind.REVOKE,
                channel="mailto",
                actor=a,
                ip=ctx.client.addr,
                user_agent=_user_agent(ctx),
                message_id=str(ctx.message.headers.get("Message-ID", "")).strip(),
                raw=ctx.message.content,
                detail=detail,
            )
        )

    async def tell(written: list[Event]) -> None:
        for e in written:
            if e.address in notices:
                svc.spawn(send_notice(svc.downstream, lst.cfg, e.address, notices[e.address][0]))

    svc.record(f"unsubscribe from {lst.id}", events, tell)


def _complaint_target(
    svc: OptinService, ctx: Context, reg: Registry, c: Complaint
) -> tuple[MailingList | None, list[str]]:
    """The list (by return path, else List-Id) and its subscribers the report names."""
    lst = None
    encoded = None
    rp = reg.any_return_path(c.mail_from) if c.mail_from else None
    if rp is not None:
        lst, m = rp
        encoded = verp_decode(m.group(1)) if m.groups() else None
    if lst is None and c.list_id:
        lst = reg.get(c.list_id)
    if lst is None:
        return None, []
    candidates = c.rcpt_to + ([encoded] if encoded else []) + (c.to if len(c.to) == 1 else [])
    known = [
        a
        for a in dict.fromkeys(candidates)
        if svc.standing(lst.id, a, ctx.config).state is not State.UNKNOWN
    ]
    return lst, known


def complaint(svc: OptinService, ctx: Context, reg: Registry) -> bool:
    assert ctx.message is not None
    c = parse_arf(ctx.message.content)
    if c is None:
        return False
    if c.feedback_type not in COMPLAINT_TYPES:
        log.info(
            "optin: arf feedback_type=%s ignored client=%s",
            clean(c.feedback_type),
            clean(ctx.client.label),
        )
        return True
    lst, targets = _complaint_target(svc, ctx, reg, c)
    if lst is None or not targets:
        log.warning(
            "optin: complaint not mapped to a subscriber: list=%s mail_from=%s rcpt=%s "
            "list_id=%s reporter=%s",
            lst.id if lst else "-",
            clean(c.mail_from),
            clean(",".join(c.rcpt_to) or "-"),
            clean(c.list_id or "-"),
            clean(c.reporter or "-"),
        )
        return True
    events = []
    for a in targets:
        detail = {
            **_common(ctx),
            "feedback_type": c.feedback_type,
            "reporter": c.reporter,
            "source_ip": c.source_ip,
            "original_message_id": c.message_id,
            "arrival_date": c.arrival,
            "previous_state": str(svc.standing(lst.id, a, ctx.config).state),
        }
        events.append(
            dict(
                list_id=lst.id,
                address=a,
                kind=Kind.COMPLAINT,
                channel="complaint",
                actor=c.reporter or (ctx.sender.addr if ctx.sender else ""),
                ip=ctx.client.addr,
                user_agent=c.reporter,
                message_id=str(ctx.message.headers.get("Message-ID", "")).strip(),
                raw=ctx.message.content,
                detail=detail,
            )
        )
    list_id = lst.id

    async def judge(written: list[Event]) -> None:
        svc.judge_complaints(list_id)

    svc.record(f"complaint on {lst.id}", events, judge)
    return True


def bounce(svc: OptinService, ctx: Context, lst: MailingList, m: re.Match[str]) -> bool:
    assert ctx.message is not None
    found = parse_dsn(ctx.message.content)
    if not found:
        return False
    encoded = verp_decode(m.group(1)) if m.groups() else None
    events = []
    for b in found:
        a = (
            b.recipient
            if svc.standing(lst.id, b.recipient, ctx.config).state is not State.UNKNOWN
            else (encoded or b.recipient)
        )
        st = svc.standing(lst.id, a, ctx.config)
        if not address_failure(b.status):
            log.info(
                "optin: list=%s address=%s bounce status=%s not an address failure: kept",
                lst.id,
                clean(a),
                clean(b.status),
            )
            continue
        if st.state is State.UNKNOWN or st.state in GONE:
            continue
        detail = {
            **_common(ctx),
            "status": b.status,
            "diagnostic": b.diagnostic,
            "previous_state": str(st.state),
        }
        events.append(
            dict(
                list_id=lst.id,
                address=a,
                kind=Kind.BOUNCE,
                channel="bounce",
                actor=ctx.client.label,
                ip=ctx.client.addr,
                message_id=str(ctx.message.headers.get("Message-ID", "")).strip(),
                raw=ctx.message.content,
                detail=detail,
            )
        )
    if events:
        svc.record(f"bounce on {lst.id}", events)
    return True
