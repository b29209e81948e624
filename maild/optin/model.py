"""Consent events and the subscription state derived from them.

Nothing but events is stored: a recipient's state (pending, confirmed, revoked,
suppressed) is a fold over the events of that list and address, so the state can
always be explained by the evidence and never disagrees with it.

Two rules make the fold more than "last event wins": a list owner's word (owner-add,
import) never overrides the subscriber's own revocation, complaint or a bounce; only a
new confirmation by the subscriber does. And a new subscription request does not
downgrade someone already confirmed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class Kind(StrEnum):
    REQUEST = "request"
    CONFIRM = "confirm"
    OWNER_ADD = "owner-add"
    IMPORT = "import"
    REVOKE = "revoke"
    COMPLAINT = "complaint"
    BOUNCE = "bounce"


class State(StrEnum):
    UNKNOWN = "unknown"  # no event: never stored, the answer for strangers
    PENDING = "pending"
    CONFIRMED = "confirmed"
    REVOKED = "revoked"
    SUPPRESSED = "suppressed"


# How the subscriber (or someone) expressed what the event records.
CHANNELS = ("web", "email", "api", "import", "mailto", "one-click", "complaint", "bounce", "cli")

ATTESTED = (Kind.OWNER_ADD, Kind.IMPORT)
GONE = (State.REVOKED, State.SUPPRESSED)


def iso(ts: float) -> str:
    """UTC, microseconds, fixed width: sorts as text and hashes the same everywhere."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def from_iso(s: str) -> float:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def now_iso() -> str:
    return iso(time.time())


@dataclass(frozen=True)
class Event:
    """One row of the ledger, exactly as hashed (see maild.optin.chain)."""

    list_id: str
    seq: int
    ts: str
    address: str
    kind: Kind
    channel: str
    actor: str = ""
    ip: str = ""
    user_agent: str = ""
    consent_hash: str = ""
    token_hash: str = ""
    message_id: str = ""
    raw_sha256: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    prev_hash: str = ""
    hash: str = ""
    id: int = 0  # the store's row id; not part of the hash


@dataclass(frozen=True, slots=True)
class Standing:
    """A recipient's state on one list and the event that decided it."""

    state: State = State.UNKNOWN
    since: str = ""
    basis: str = ""  # the deciding event's kind
    channel: str = ""

    @property
    def sendable(self) -> bool:
        return self.state is State.CONFIRMED


def apply(st: Standing, kind: Kind, ts: str, channel: str) -> Standing:
    """The state after one more event."""
    if kind is Kind.REQUEST:
        if st.state is State.CONFIRMED:
            return st
        return Standing(State.PENDING, ts, kind.value, channel)
    if kind is Kind.CONFIRM:
        return Standing(State.CONFIRMED, ts, kind.value, channel)
    if kind in ATTESTED:
        if st.state in GONE or st.state is State.CONFIRMED:
            return st
        return Standing(State.CONFIRMED, ts, kind.value, channel)
    if kind is Kind.REVOKE:
        return st if st.state is State.REVOKED else Standing(State.REVOKED, ts, kind.value, channel)
    # complaint, bounce
    return Standing(State.SUPPRESSED, ts, kind.value, channel)


def effective(st: Standing, *, attested_ok: bool) -> Standing:
    """With `attested_consent = false` only the subscriber's own confirmation counts."""
    if not attested_ok and st.state is State.CONFIRMED and st.basis in ATTESTED:
        return Standing(State.PENDING, st.since, st.basis, st.channel)
    return st


def fold(events: list[Event], *, attested_ok: bool = True) -> Standing:
    st = Standing()
    for e in events:
        if isinstance(e.kind, Kind):
            st = apply(st, e.kind, e.ts, e.channel)
    return effective(st, attested_ok=attested_ok)
