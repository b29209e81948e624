"""The hash chain that makes the ledger tamper-evident, one chain per list.

Each row's hash is SHA-256 over the previous row's hash and a canonical JSON rendering of
the row (sorted keys, no whitespace, ASCII): changing any field of any row, deleting a
row or reordering rows breaks every later link, and `maild optin verify` says where.
The raw message is covered through its SHA-256, so an altered raw message is caught too.

Truncating the newest rows of a chain leaves a valid shorter chain; the chain heads
table and the hash in each event's syslog line (kept outside the database) catch that.

A third party can recompute a row from the evidence bundle alone:

    sha256(prev_hash + "\\n" + canonical_json(row)) == hash
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _q  # what json.dumps uses for str
from typing import Any

from maild.optin.model import Event

VERSION = 1
GENESIS = "0" * 64
HASHED = (
    "list_id",
    "seq",
    "ts",
    "address",
    "kind",
    "channel",
    "actor",
    "ip",
    "user_agent",
    "consent_hash",
    "token_hash",
    "message_id",
    "raw_sha256",
    "detail",
)


def detail_json(detail: dict[str, Any]) -> str:
    """A detail object as stored and hashed: canonical JSON."""
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical(e: Event) -> str:
    """The definition: the hashed fields as canonical JSON (what README.txt documents)."""
    doc: dict[str, Any] = {k: getattr(e, k) for k in HASHED}
    doc["kind"] = str(e.kind)
    doc["v"] = VERSION
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical_row(
    list_id: str,
    seq: int,
    ts: str,
    address: str,
    kind: str,
    channel: str,
    actor: str,
    ip: str,
    user_agent: str,
    consent_hash: str,
    token_hash: str,
    message_id: str,
    raw_sha256: str,
    detail: str,
) -> str:
    """The same text built from a stored row, whose detail is already canonical JSON:
    about ten times faster than canonical(), which matters when verify walks a chain of
    millions of rows. A stored detail that is not canonical simply fails to verify."""
    return (
        '{"actor":'
        + _q(actor)
        + ',"address":'
        + _q(address)
        + ',"channel":'
        + _q(channel)
        + ',"consent_hash":'
        + _q(consent_hash)
        + ',"detail":'
        + detail
        + ',"ip":'
        + _q(ip)
        + ',"kind":'
        + _q(kind)
        + ',"list_id":'
        + _q(list_id)
        + ',"message_id":'
        + _q(message_id)
        + ',"raw_sha256":'
        + _q(raw_sha256)
        + ',"seq":'
        + str(int(seq))
        + ',"token_hash":'
        + _q(token_hash)
        + ',"ts":'
        + _q(ts)
        + ',"user_agent":'
        + _q(user_agent)
        + ',"v":'
        + str(VERSION)
        + "}"
    )


def digest(prev_hash: str, text: str) -> str:
    return hashlib.sha256((prev_hash + "\n" + text).encode("ascii")).hexdigest()


def row_hash(e: Event, prev_hash: str) -> str:
    return digest(prev_hash, canonical(e))


@dataclass(frozen=True, slots=True)
class Break:
    """One place where a chain does not hold."""

    list_id: str
    seq: int
    problem: str

    def __str__(self) -> str:
        return f"list={self.list_id} seq={self.seq}: {self.problem}"


class Verifier:
    """Checks one list's rows fed in seq order; memory stays O(1) for any chain length."""

    def __init__(self, list_id: str):
        self.list_id = list_id
        self.prev = GENESIS
        self.expected_seq = 1
        self.rows = 0
        self.breaks: list[Break] = []
        self.bad_seqs: set[int] = set()

    def feed(self, e: Event) -> bool:
        """Check one row; True when it is intact and linked to the row before it."""
        return self._check(
            e.seq, e.prev_hash, e.hash, row_hash(e, e.prev_hash) == e.hash, str(e.kind), e.address
        )

    def feed_row(self, r: tuple) -> bool:
        """The same for a stored row: (list_id, seq, ts, address, event, channel, actor, ip,
        user_agent, consent_hash, token_hash, message_id, raw_sha256, detail, prev_hash,
        hash), as maild.optin.ledger.Ledger.chain_rows returns them."""
        try:
            intact = digest(r[14], canonical_row(*r[:14])) == r[15]
        except (TypeError, ValueError, UnicodeEncodeError):  # a NULL or odd type: tampered
            intact = False
        return self._check(int(r[1]), str(r[14]), str(r[15]), intact, str(r[4]), str(r[3]))

    def _check(
        self, seq: int, prev_hash: str, h: str, intact: bool, kind: str, address: str
    ) -> bool:
        ok = True
        self.rows += 1
        if seq != self.expected_seq:
            missing = (
                f"{self.expected_seq}"
                if seq == self.expected_seq + 1
                else f"{self.expected_seq}..{seq - 1}"
            )
            self.breaks.append(
                Break(
                    self.list_id,
                    seq,
                    (
                        f"row(s) {missing} missing (deleted)"
                        if seq > self.expected_seq
                        else f"sequence number repeats or goes back (expected {self.expected_seq})"
                    ),
                )
            )
            ok = False
        if prev_hash != self.prev:
            self.breaks.append(
                Break(
                    self.list_id,
                    seq,
                    "previous-hash link broken (a row before it was changed, deleted or inserted)",
                )
            )
            ok = False
        if not intact:
            self.breaks.append(
                Break(
                    self.list_id,
                    seq,
                    f"{kind} event for {address} was altered after it was written (hash mismatch)",
                )
            )
            ok = False
        if not ok:
            self.bad_seqs.add(seq)
        self.prev = h
        self.expected_seq = seq + 1
        return ok

    def check_head(self, head: tuple[int, str] | None) -> None:
        """Compare with the recorded chain head: catches rows cut off the end."""
        if head is None:
            if self.rows:
                self.breaks.append(Break(self.list_id, 0, "no chain head recorded"))
            return
        seq, h = head
        last = self.expected_seq - 1
        if seq != last or (self.rows and h != self.prev):
            self.breaks.append(
                Break(
                    self.list_id,
                    seq,
                    (
                        f"chain ends at seq {last} but its recorded head is seq {seq} "
                        "(rows at the end were deleted or the head was altered)"
                    ),
                )
            )

    @property
    def ok(self) -> bool:
        return not self.breaks

    @property
    def head(self) -> tuple[int, str]:
        return self.expected_seq - 1, self.prev
