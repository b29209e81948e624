"""What an operator or a customer's software asks of the ledger: request, add, import, revoke.

Used by `maild optin ...` (and usable by an API later). Each action appends events, tells
a running daemon through the store's `control` table, and logs one line per event.
There is deliberately no "confirm" action: a confirmation is the subscriber's own reply
passing through maild, and an operator saying so is not consent (that is what owner-add
with an attestation is for, and it is recorded as exactly that).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime

from maild.address import mailbox
from maild.antispam.sanctions import control
from maild.config import Config
from maild.log import clean
from maild.optin import messages
from maild.optin.ledger import Ledger
from maild.optin.model import GONE, Event, Kind, Standing, State, fold, iso, now_iso
from maild.optin.settings import ListConfig, section
from maild.optin.tokens import new_token, short, token_hash
from maild.smtp.downstream import Downstream
from maild.smtp.submit import as_bytes, submit
from maild.web import settings as web_settings

log = logging.getLogger("maild.optin")

BATCH = 500  # events per transaction in an import

_ADDRESS = re.compile(r"^[^@\s<>\"]+@[A-Za-z0-9.-]+\.[A-Za-z0-9-]+$")


class ActionError(Exception):
    """The action was refused; the message says why and what to do instead."""


def check_address(address: str) -> str:
    a = address.strip().strip("<>").lower()
    if not _ADDRESS.match(a):
        raise ActionError(f"{address!r} is not an email address such as bob@example.org")
    return a


def check_date(value: str) -> str:
    """An attestation's 'date obtained': ISO 8601 date or date and time, not in the future."""
    v = value.strip()
    try:
        d = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise ActionError(
            f"{value!r} is not a date such as 2024-03-01 or 2024-03-01T14:03:00Z"
        ) from None
    if d.timestamp() > time.time() + 86400:
        raise ActionError(f"{value!r} is in the future: consent cannot be obtained later")
    return v


def log_event(e: Event, note: str = "") -> None:
    """One line per event, Postfix style; never a token or a message body."""
    parts = [
        f"list={clean(e.list_id)}",
        f"address={clean(e.address)}",
        f"event={e.kind}",
        f"channel={clean(e.channel)}",
        f"seq={e.seq}",
        f"hash={short(e.hash)}",
    ]
    if e.actor:
        parts.append(f"actor={clean(e.actor, 80)}")
    if e.ip:
        parts.append(f"ip={clean(e.ip, 60)}")
    if e.token_hash:
        parts.append(f"token_hash={short(e.token_hash)}")
    if e.raw_sha256:
        parts.append(f"raw={short(e.raw_sha256)}")
    if note:
        parts.append(note)
    log.warning("optin: %s", " ".join(parts))


async def standing(
    ledger: Ledger, list_id: str, address: str, *, attested_ok: bool = True
) -> tuple[Standing, list[Event]]:
    events = await ledger.events_for(address, list_id)
    return fold(events, attested_ok=attested_ok), events


@dataclass
class RequestResult:
    event: Event
    sent: bool
    reply: str
    message_id: str


async def request(
    ledger: Ledger,
    config: Config,
    downstream: Downstream | None,
    lst: ListConfig,
    address: str,
    *,
    channel: str = "web",
    actor: str = "",
    ip: str = "",
    user_agent: str = "",
    evidence: bytes | None = None,
    now: float | None = None,
    attempts: int = 2,
    delay: float = 2.0,
    detail: dict[str, object] | None = None,
) -> RequestResult:
    """Record a subscription request and send the confirmation mail with a fresh token."""
    s = section(config)
    address = check_address(address)
    now = now or time.time()
    st, _ = await standing(ledger, lst.id, address, attested_ok=s.attested_consent)
    if st.state is State.CONFIRMED:
        raise ActionError(
            f"{address} is already a confirmed subscriber of {lst.id} "
            f"(since {st.since}, by {st.basis})"
        )
    n = await ledger.count_requests(lst.id, address, now - 86400)
    if n >= s.max_requests:
        raise ActionError(
            f"{mailbox(address)} was sent {n} confirmation requests for {lst.id} in the "
            f"last 24 hours, to it or a +tag of it (max_requests = {s.max_requests}); "
            "more would be subscription bombing"
        )
    if not lst.domain:
        raise ActionError(f"list {lst.id} has no domain for confirm+TOKEN@ replies")
    token = new_token()
    expires = iso(now + s.token_lifetime)
    msg, mid = messages.confirmation(
        lst,
        address,
        token,
        confirm_local=s.confirm_local_part,
        hostname=config.server.hostname,
        when=iso(now)[:19],
        expires=expires[:19],
        ip=ip,
        confirm_url=web_settings.confirm_url(config, token),
    )
    sent_copy = await ledger.put_raw(messages.redacted(msg, token))
    ev = await ledger.append(
        list_id=lst.id,
        address=address,
        kind=Kind.REQUEST,
        channel=channel,
        actor=actor,
        ip=ip,
        user_agent=user_agent,
        consent_text=lst.consent_text,
        token_hash=token_hash(token),
        message_id=mid,
        raw=evidence,
        ts=now,
        detail={
            **(detail or {}),
            "expires": expires,
            "confirm_domain": lst.domain,
            "confirmation_sha256": sent_copy,
        },
    )
    await control(ledger.store, "optin", lst.id)
    log_event(ev, f"expires={expires}")
    if downstream is None:
        return RequestResult(ev, False, "no downstream", mid)
    reply, took = await submit(
        downstream,
        lst.owner,
        [address],
        as_bytes(msg),
        attempts=attempts,
        delay=delay,
        what=f"optin confirmation list={lst.id}",
    )
    text = (
        f"{reply.code} {reply.text.splitlines()[0] if reply.text else ''}"
        if reply
        else "downstream unreachable"
    )
    sent = reply is not None and bool(took)
    (log.info if sent else log.error)(
        "optin: list=%s address=%s confirmation=%s status=%s",
        clean(lst.id),
        clean(address),
        "sent" if sent else "not-sent",
        clean(text),
    )
    return RequestResult(ev, sent, text, mid)


async def attest(
    ledger: Ledger,
    lst: ListConfig,
    addresses: list[str],
    *,
    kind: Kind,
    source: str,
    obtained: str,
    actor: str,
    channel: str,
    ip: str = "",
    user_agent: str = "",
    evidence: bytes | None = None,
) -> tuple[list[Event], dict[str, str]]:
    """owner-add / import: the owner's attestation that consent was obtained elsewhere.

    Never re-adds an address that revoked, complained or bounced: only the subscriber's
    own confirmation can undo that. Returns (events written, {address: why skipped}).
    """
    if not source.strip():
        raise ActionError("an attestation needs a source: where and how consent was obtained")
    obtained = check_date(obtained)
    skipped: dict[str, str] = {}
    raw_sha = await ledger.put_raw(evidence) if evidence else ""
    c_hash = await ledger.put_consent_text(lst.consent_text)
    if len(addresses) > 20:  # one pass over the list beats one query per address
        from maild.optin.evidence import subscribers

        known = await subscribers(ledger, lst.id)
    else:
        known = {}
        for a in addresses:
            with contextlib.suppress(ActionError):
                known[check_address(a)] = (await standing(ledger, lst.id, check_address(a)))[0]
    stamp = now_iso()
    todo: list[Event] = []
    for a in addresses:
        try:
            a = check_address(a)
        except ActionError as err:
            skipped[a] = str(err)
            continue
        st = known.get(a, Standing())
        if st.state in GONE:
            skipped[a] = (
                f"{st.state} since {st.since} ({st.basis}); an owner cannot re-add "
                "someone who left: only their own confirmation can "
                "(maild optin request)"
            )
            continue
        if st.state is State.CONFIRMED:
            skipped[a] = f"already confirmed since {st.since} ({st.basis})"
            continue
        known[a] = Standing(State.CONFIRMED, stamp, str(kind), channel)  # duplicates in a file
        todo.append(
            Event(
                list_id=lst.id,
                seq=0,
                ts=stamp,
                address=a,
                kind=kind,
                channel=channel,
                actor=actor,
                ip=ip,
                user_agent=user_agent[:500],
                consent_hash=c_hash,
                raw_sha256=raw_sha,
                detail={"attestation": {"source": source.strip()[:500], "obtained": obtained}},
            )
        )
    written: list[Event] = []
    for i in range(0, len(todo), BATCH):
        batch = await ledger.append_many(lst.id, todo[i : i + BATCH])
        written += batch
        for e in batch:
            log_event(e)
    if written:
        await control(ledger.store, "optin", lst.id)
    return written, skipped


@dataclass
class RevokeResult:
    event: Event
    before: Standing
    notified: bool


async def revoke(
    ledger: Ledger,
    config: Config,
    downstream: Downstream | None,
    lst: ListConfig,
    address: str,
    *,
    channel: str,
    actor: str,
    ip: str = "",
    user_agent: str = "",
    reason: str = "",
    evidence: bytes | None = None,
    notify: bool = True,
    attempts: int = 2,
    delay: float = 2.0,
    detail: dict[str, object] | None = None,
) -> RevokeResult:
    """Record a revocation (honoured at once) and tell the subscriber, once."""
    address = check_address(address)
    before, _ = await standing(ledger, lst.id, address)
    now = time.time()
    notify = (
        notify
        and section(config).notify_revocation
        and downstream is not None
        and before.state in (State.CONFIRMED, State.PENDING)
    )
    notice, mid = messages.revocation_notice(
        lst, address, channel=channel, when=iso(now)[:19], hostname=config.server.hostname
    )
    detail = {**(detail or {}), "previous_state": str(before.state)}
    if reason:
        detail["reason"] = reason[:500]
    if notify:
        detail["notice_message_id"] = mid
    ev = await ledger.append(
        list_id=lst.id,
        address=address,
        kind=Kind.REVOKE,
        channel=channel,
        actor=actor,
        ip=ip,
        user_agent=user_agent,
        raw=evidence,
        detail=detail,
        ts=now,
    )
    await control(ledger.store, "optin", lst.id)
    log_event(ev, f"previous={before.state}")
    sent = False
    if notify and downstream is not None:
        sent = await send_notice(downstream, lst, address, notice, attempts=attempts, delay=delay)
    return RevokeResult(ev, before, sent)


async def send_notice(
    downstream: Downstream,
    lst: ListConfig,
    address: str,
    notice: object,
    *,
    attempts: int = 3,
    delay: float = 30.0,
) -> bool:
    reply, took = await submit(
        downstream,
        "",
        [address],
        as_bytes(notice),  # type: ignore[arg-type]
        attempts=attempts,
        delay=delay,
        what=f"optin revocation notice list={lst.id}",
    )
    ok = reply is not None and bool(took)
    (log.info if ok else log.error)(
        "optin: list=%s address=%s notice=%s",
        clean(lst.id),
        clean(address),
        "sent" if ok else "not-sent",
    )
    return ok
