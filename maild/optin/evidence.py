"""Evidence of consent on demand, and verification of the whole ledger.

The AUP: "evidence consent within 72 hours". `maild optin evidence ADDRESS` writes one
zip file, at once: evidence.json (every event for the address, each with its hash and
the verification of its list's whole chain), the raw messages (subscription requests,
the confirmation reply with all its headers, unsubscribe mail, complaints), the
confirmation mail maild sent (token replaced by its hash), and the consent texts the
subscriber was shown. Nothing in it needs maild to be read; README.txt says how a third
party recomputes each row's hash.

`maild optin verify` walks every chain from its first row (in pages, so memory does not
grow with the ledger), compares each chain with its recorded head, and re-hashes every
stored raw message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maild.config import Config
from maild.optin.chain import GENESIS, HASHED, VERSION, Verifier, row_hash
from maild.optin.ledger import Ledger, unpack
from maild.optin.model import Event, Kind, Standing, apply, effective, now_iso
from maild.optin.settings import section

PAGE = 10000


@dataclass
class ChainReport:
    list_id: str
    rows: int = 0
    head: tuple[int, str] = (0, GENESIS)
    recorded_head: tuple[int, str] | None = None
    breaks: list[str] = field(default_factory=list)
    bad_seqs: set[int] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.breaks

    def as_dict(self) -> dict[str, Any]:
        return {
            "list_id": self.list_id,
            "verified": self.ok,
            "rows": self.rows,
            "head": {"seq": self.head[0], "hash": self.head[1]},
            "recorded_head": (
                {"seq": self.recorded_head[0], "hash": self.recorded_head[1]}
                if self.recorded_head
                else None
            ),
            "breaks": self.breaks,
        }


async def verify_chain(ledger: Ledger, list_id: str) -> ChainReport:
    v = Verifier(list_id)
    after = 0
    while True:
        rows = await ledger.chain_rows(list_id, after, PAGE)
        for r in rows:
            v.feed_row(r)
        if len(rows) < PAGE:
            break
        after = int(rows[-1][1])
    recorded = await ledger.head(list_id)
    v.check_head(recorded)
    return ChainReport(list_id, v.rows, v.head, recorded, [str(b) for b in v.breaks], v.bad_seqs)


async def verify_raw(ledger: Ledger) -> list[str]:
    """Every stored raw message still has the hash the events recorded; none is missing."""
    problems = []
    after = 0
    while True:
        page = await ledger.raw_page(after)
        for rid, sha, data in page:
            try:
                ok = hashlib.sha256(unpack(data)).hexdigest() == sha
            except Exception:  # noqa: BLE001  undecodable data is tampering too
                ok = False
            if not ok:
                problems.append(f"raw message {sha[:12]} (row {rid}) was altered (hash mismatch)")
        if len(page) < 200:
            break
        after = page[-1][0]
    rows = await ledger.store.fetchall(
        "SELECT list_id, seq, raw_sha256 FROM optin_events e WHERE raw_sha256 <> '' AND NOT "
        "EXISTS (SELECT 1 FROM optin_raw r WHERE r.sha256 = e.raw_sha256)"
    )
    problems += [
        f"list={lid} seq={seq}: raw message {sha[:12]} is missing (deleted)"
        for lid, seq, sha in rows
    ]
    return problems


@dataclass
class VerifyReport:
    chains: list[ChainReport]
    raw_problems: list[str]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.chains) and not self.raw_problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "chains": [c.as_dict() for c in self.chains],
            "raw_problems": self.raw_problems,
            "checked_at": now_iso(),
        }


async def verify_all(ledger: Ledger, list_id: str | None = None) -> VerifyReport:
    ids = [list_id] if list_id else await ledger.chain_ids()
    chains = [await verify_chain(ledger, lid) for lid in ids]
    return VerifyReport(chains, await verify_raw(ledger))


async def subscribers(
    ledger: Ledger, list_id: str, *, attested_ok: bool = True
) -> dict[str, Standing]:
    """Every address ever seen on a list and its standing now."""
    out: dict[str, Standing] = {}
    after = 0
    while True:
        rows = await ledger.events_of_list(list_id, after, PAGE)
        for e in rows:
            if isinstance(e.kind, Kind):
                out[e.address] = apply(out.get(e.address, Standing()), e.kind, e.ts, e.channel)
        if len(rows) < PAGE:
            break
        after = rows[-1].seq
    return {a: effective(st, attested_ok=attested_ok) for a, st in out.items()}


README = """\
Evidence of consent exported by maild
=====================================

evidence.json      every consent event recorded for {address}, oldest first per list,
                   with the verification of each list's hash chain at export time
messages/          the raw messages the events refer to, exactly as received (all
                   headers): subscription requests, confirmation replies, unsubscribe
                   requests, complaints; and *-confirmation-sent.eml, the confirmation
                   maild sent (its single-use token replaced by the token's hash);
                   *.http: the raw HTTP requests maild's own pages received (subscribe
                   form, confirmation button, one-click unsubscribe: request line,
                   headers, body; a token in them replaced by its hash)
consent/           the consent texts the subscriber was shown, named by their SHA-256

Events
  request    someone asked to subscribe the address (web form, email, API); maild
             sent a confirmation with a single-use token (stored only as a hash)
  confirm    the subscriber replied to that confirmation, or pressed the button on
             the page its link opens: proof that the owner of the mailbox agreed (the
             reply or the HTTP request is in messages/, with all its headers)
  owner-add  the list owner attested that consent was obtained elsewhere (source and
             date in detail.attestation); this is the owner's word, not maild's proof
  import     the same for many addresses at once
  revoke     the subscriber unsubscribed (mailto, one-click, request to the owner)
  complaint  a mailbox provider reported the list's mail as spam (ARF report)
  bounce     the address does not exist (permanent delivery failure)

How to check a row yourself
  Each event's "hash" is SHA-256 over its "prev_hash", a newline, and the canonical
  JSON of these fields of the event plus "v": {version}, with keys sorted, no whitespace
  (separators "," and ":"), non-ASCII escaped ("kind" is the event name). In Python:

    import hashlib, json
    FIELDS = {fields}
    doc = {{k: event[k] for k in FIELDS}}; doc["v"] = {version}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    hashlib.sha256((event["prev_hash"] + "\\n" + text).encode()).hexdigest() == event["hash"]

  Each raw message's SHA-256 is the event's "raw_sha256". The rows form one chain per
  list (each row holds the previous row's hash); maild verified the whole chain at
  export ("chain" in evidence.json), and its syslog has one line per event with the
  first 12 characters of the row's hash, an independent record of the chain.
"""


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9@._+-]", "_", s)[:120]


def event_doc(
    e: Event, *, raw_file: str, raw_intact: bool | None, chain_ok: bool, consent_file: str
) -> dict[str, Any]:
    return {
        "list_id": e.list_id,
        "seq": e.seq,
        "ts": e.ts,
        "address": e.address,
        "kind": str(e.kind),
        "channel": e.channel,
        "actor": e.actor,
        "ip": e.ip,
        "user_agent": e.user_agent,
        "consent_hash": e.consent_hash,
        "consent_text_file": consent_file,
        "token_hash": e.token_hash,
        "message_id": e.message_id,
        "raw_sha256": e.raw_sha256,
        "raw_file": raw_file,
        "raw_intact": raw_intact,
        "detail": e.detail,
        "prev_hash": e.prev_hash,
        "hash": e.hash,
        "row_hash_ok": row_hash(e, e.prev_hash) == e.hash,
        "chain_ok": chain_ok,
    }


@dataclass
class Bundle:
    path: Path
    doc: dict[str, Any]


async def build(
    ledger: Ledger,
    config: Config,
    address: str,
    *,
    list_id: str | None = None,
    out_dir: Path = Path("."),
    registry: Any = None,
) -> Bundle:
    """Write the evidence bundle for one address; return its path and evidence.json."""
    from maild import __version__

    address = address.strip().strip("<>").lower()
    events = await ledger.events_for(address, list_id)
    attested_ok = section(config).attested_consent
    files: dict[str, bytes] = {}
    consent: dict[str, str] = {}
    lists_doc: list[dict[str, Any]] = []
    events_doc: list[dict[str, Any]] = []
    for lid in sorted({e.list_id for e in events}):
        mine = [e for e in events if e.list_id == lid]
        chain = await verify_chain(ledger, lid)
        st = Standing()
        for e in mine:
            if isinstance(e.kind, Kind):
                st = apply(st, e.kind, e.ts, e.channel)
        st = effective(st, attested_ok=attested_ok)
        lst = registry.get(lid) if registry is not None else None
        lists_doc.append(
            {
                "list_id": lid,
                "registered": lst is not None,
                "customer": lst.customer if lst else None,
                "owner": lst.cfg.owner if lst else None,
                "name": lst.cfg.name if lst else None,
                "state": str(st.state),
                "since": st.since,
                "decided_by": st.basis,
                "chain": chain.as_dict(),
                "this_address_rows_intact": all(e.seq not in chain.bad_seqs for e in mine),
            }
        )
        for e in mine:
            raw_file, intact = "", None
            if e.raw_sha256:
                raw = await ledger.raw(e.raw_sha256)
                if raw is not None:
                    ext = "http" if "http" in e.detail else "eml"  # maild's own pages
                    raw_file = f"messages/{_safe(lid)}/{e.seq:06d}-{e.kind}.{ext}"
                    files[raw_file] = raw
                    intact = hashlib.sha256(raw).hexdigest() == e.raw_sha256
                else:
                    intact = False
            sent = str(e.detail.get("confirmation_sha256", ""))
            if sent:
                copy = await ledger.raw(sent)
                if copy is not None:
                    files[f"messages/{_safe(lid)}/{e.seq:06d}-confirmation-sent.eml"] = copy
            cfile = ""
            if e.consent_hash:
                if e.consent_hash not in consent:
                    text = await ledger.consent_text(e.consent_hash)
                    consent[e.consent_hash] = f"consent/{e.consent_hash}.txt" if text else ""
                    if text:
                        files[consent[e.consent_hash]] = text.encode("utf-8") + b"\n"
                cfile = consent[e.consent_hash]
            events_doc.append(
                event_doc(
                    e,
                    raw_file=raw_file,
                    raw_intact=intact,
                    chain_ok=e.seq not in chain.bad_seqs,
                    consent_file=cfile,
                )
            )
    generated_at = now_iso()
    doc = {
        "format": "maild-optin-evidence/1",
        "address": address,
        "list_filter": list_id,
        "generated_at": generated_at,
        "generated_by": f"maild {__version__} on {socket.getfqdn()}",
        "policy": config.path,
        "verified": all(x["chain"]["verified"] for x in lists_doc)
        and all(ev["raw_intact"] is not False for ev in events_doc),
        "lists": lists_doc,
        "events": events_doc,
        "hash_fields": list(HASHED),
        "hash_version": VERSION,
    }
    stamp = generated_at[:19].replace("-", "").replace(":", "") + "Z"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"optin-evidence-{_safe(address)}-{stamp}.zip"
    fd, tmp = tempfile.mkstemp(prefix=".optin-evidence-", suffix=".zip", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("evidence.json", json.dumps(doc, indent=2, sort_keys=True) + "\n")
            z.writestr(
                "README.txt",
                README.format(address=address, fields=json.dumps(list(HASHED)), version=VERSION),
            )
            for name, data in sorted(files.items()):
                z.writestr(name, data)
        os.chmod(tmp, 0o600)  # personal data
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Bundle(path, doc)
