"""The consent ledger in the state store: append-only events, raw messages, lists.

Appending is the only write to `optin_events`. The next row of a list's chain needs the
hash of the row before it, read and written by separate statements, so two writers
(the daemon and a CLI command) may race: the UNIQUE(list_id, seq) constraint makes the
loser fail, and it simply reads the new head and tries again.

Raw messages are stored once per content (keyed by SHA-256), zlib-compressed and base64
encoded as text, which every SQL backend stores alike.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import zlib
from dataclasses import replace
from typing import Any

from maild.address import mailbox
from maild.optin.chain import GENESIS, detail_json, row_hash
from maild.optin.model import Event, Kind, iso, now_iso
from maild.optin.settings import ListConfig, consent_hash
from maild.store.base import Store, StoreError

# The optin schema, in order (maild.components hands it to the store).
MIGRATIONS = (
    """
    CREATE TABLE optin_events (
        id INTEGER PRIMARY KEY,
        list_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        ts TEXT NOT NULL,               -- UTC, 2024-05-01T12:00:00.000000Z
        address TEXT NOT NULL,
        event TEXT NOT NULL,            -- request, confirm, owner-add, import, revoke, complaint, bounce
        channel TEXT NOT NULL,
        actor TEXT NOT NULL,
        ip TEXT NOT NULL,
        user_agent TEXT NOT NULL,
        consent_hash TEXT NOT NULL,
        token_hash TEXT NOT NULL,       -- SHA-256 of the token, never the token
        message_id TEXT NOT NULL,
        raw_sha256 TEXT NOT NULL,       -- optin_raw.sha256, or ''
        detail TEXT NOT NULL,           -- canonical JSON
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        UNIQUE (list_id, seq)
    );
    CREATE INDEX optin_events_address ON optin_events(address, list_id);
    CREATE INDEX optin_events_token ON optin_events(token_hash);
    CREATE TABLE optin_heads (
        list_id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE TABLE optin_raw (
        id INTEGER PRIMARY KEY,
        sha256 TEXT NOT NULL UNIQUE,
        size INTEGER NOT NULL,
        data TEXT NOT NULL              -- base64 of zlib
    );
    CREATE TABLE optin_consent_texts (
        hash TEXT PRIMARY KEY,
        text TEXT NOT NULL,
        first_seen TEXT NOT NULL
    );
    CREATE TABLE optin_lists (
        id TEXT PRIMARY KEY,
        customer TEXT NOT NULL,
        owner TEXT NOT NULL,
        domain TEXT NOT NULL,
        name TEXT NOT NULL,
        return_paths TEXT NOT NULL,     -- JSON array
        unsubscribe TEXT NOT NULL,      -- JSON array
        consent_text TEXT NOT NULL,
        created TEXT NOT NULL,
        actor TEXT NOT NULL
    );
    CREATE TABLE optin_delivered (
        list_id TEXT NOT NULL,
        hour INTEGER NOT NULL,          -- unix time // 3600
        n INTEGER NOT NULL,
        PRIMARY KEY (list_id, hour)
    );
    """,
)

EVENT_COLUMNS = (
    "id",
    "list_id",
    "seq",
    "ts",
    "address",
    "event",
    "channel",
    "actor",
    "ip",
    "user_agent",
    "consent_hash",
    "token_hash",
    "message_id",
    "raw_sha256",
    "detail",
    "prev_hash",
    "hash",
)
_SELECT = f"SELECT {', '.join(EVENT_COLUMNS)} FROM optin_events"
_INSERT = (
    f"INSERT INTO optin_events({', '.join(EVENT_COLUMNS[1:])}) "
    f"VALUES ({', '.join('?' * (len(EVENT_COLUMNS) - 1))})"
)
_ATTEMPTS = 20


def _row(r: tuple) -> Event:
    d = dict(zip(EVENT_COLUMNS, r, strict=True))
    try:
        detail = json.loads(d["detail"])
    except ValueError:
        detail = {"unreadable": d["detail"]}
    return Event(
        list_id=d["list_id"],
        seq=d["seq"],
        ts=d["ts"],
        address=d["address"],
        kind=Kind(d["event"]) if d["event"] in Kind._value2member_map_ else d["event"],
        channel=d["channel"],
        actor=d["actor"],
        ip=d["ip"],
        user_agent=d["user_agent"],
        consent_hash=d["consent_hash"],
        token_hash=d["token_hash"],
        message_id=d["message_id"],
        raw_sha256=d["raw_sha256"],
        detail=detail,
        prev_hash=d["prev_hash"],
        hash=d["hash"],
        id=d["id"],
    )


detail_text = detail_json


def pack(raw: bytes) -> str:
    return base64.b64encode(zlib.compress(raw, 6)).decode("ascii")


def unpack(data: str) -> bytes:
    return zlib.decompress(base64.b64decode(data))


def _unique_violation(e: StoreError) -> bool:
    s = str(e).lower()
    return "unique" in s or "duplicate key" in s


class Ledger:
    """Reads and appends consent events through the store's small SQL surface."""

    def __init__(self, store: Store):
        self.store = store
        self._lock = asyncio.Lock()  # one appender per process; the constraint covers others

    # ------------------------------------------------------------------ writing

    async def put_raw(self, raw: bytes) -> str:
        sha = hashlib.sha256(raw).hexdigest()
        await self.store.execute(
            "INSERT INTO optin_raw(sha256, size, data) VALUES (?, ?, ?) "
            "ON CONFLICT(sha256) DO NOTHING",
            (sha, len(raw), pack(raw)),
        )
        return sha

    async def put_consent_text(self, text: str) -> str:
        h = consent_hash(text)
        await self.store.execute(
            "INSERT INTO optin_consent_texts(hash, text, first_seen) VALUES (?, ?, ?) "
            "ON CONFLICT(hash) DO NOTHING",
            (h, text.replace("\r\n", "\n").strip(), now_iso()),
        )
        return h

    async def append(
        self,
        *,
        list_id: str,
        address: str,
        kind: Kind,
        channel: str,
        actor: str = "",
        ip: str = "",
        user_agent: str = "",
        consent_text: str | None = None,
        consent_hash: str = "",
        token_hash: str = "",
        message_id: str = "",
        raw: bytes | None = None,
        raw_sha256: str = "",
        detail: dict[str, Any] | None = None,
        ts: float | None = None,
    ) -> Event:
        """Write one event at the end of its list's chain and return it as stored.

        `consent_text` / `raw` are stored (once per content) and referenced by hash;
        pass `consent_hash` / `raw_sha256` instead when they are stored already.
        """
        raw_sha = await self.put_raw(raw) if raw else raw_sha256
        c_hash = await self.put_consent_text(consent_text) if consent_text else consent_hash
        ev = Event(
            list_id=list_id,
            seq=0,
            ts=now_iso() if ts is None else iso(ts),
            address=address.lower(),
            kind=kind,
            channel=channel,
            actor=actor,
            ip=ip,
            user_agent=user_agent[:500],
            consent_hash=c_hash,
            token_hash=token_hash,
            message_id=message_id[:500],
            raw_sha256=raw_sha,
            detail=json.loads(detail_text(detail or {})),
        )  # as reading it back gives
        return (await self.append_many(list_id, [ev]))[0]

    async def append_many(self, list_id: str, events: list[Event]) -> list[Event]:
        """Chain events (their seq, prev_hash and hash are set here) in one transaction."""
        if not events:
            return []
        async with self._lock:
            for attempt in range(_ATTEMPTS):
                try:
                    # One transaction holding the list's lock: with several nodes on one
                    # PostgreSQL, writers of a list queue here instead of racing; the
                    # UNIQUE(list_id, seq) retry below stays as the last line of defence.
                    async with self.store.transaction():
                        await self.store.xact_lock(f"optin:{list_id}")
                        chained = await self._chain(list_id, events)
                        await self.store.executemany(
                            _INSERT,
                            [
                                (
                                    e.list_id,
                                    e.seq,
                                    e.ts,
                                    e.address,
                                    str(e.kind),
                                    e.channel,
                                    e.actor,
                                    e.ip,
                                    e.user_agent,
                                    e.consent_hash,
                                    e.token_hash,
                                    e.message_id,
                                    e.raw_sha256,
                                    detail_text(e.detail),
                                    e.prev_hash,
                                    e.hash,
                                )
                                for e in chained
                            ],
                        )
                        last = chained[-1]
                        await self.store.execute(
                            "INSERT INTO optin_heads(list_id, seq, hash) VALUES (?, ?, ?) "
                            "ON CONFLICT(list_id) DO UPDATE SET seq = excluded.seq, "
                            "hash = excluded.hash WHERE excluded.seq > optin_heads.seq",
                            (list_id, last.seq, last.hash),
                        )
                except StoreError as err:
                    if _unique_violation(err) and attempt < _ATTEMPTS - 1:
                        await asyncio.sleep(0.005 * (attempt + 1))
                        continue
                    raise
                break
        rows = await self.store.fetchall(
            _SELECT + " WHERE list_id = ? AND seq >= ? AND seq <= ? ORDER BY seq",
            (list_id, chained[0].seq, last.seq),
        )
        if len(rows) != len(chained):
            raise StoreError(f"optin events {list_id}#{chained[0].seq}.. vanished after writing")
        return [_row(r) for r in rows]

    async def _chain(self, list_id: str, events: list[Event]) -> list[Event]:
        """The events with seq, prev_hash and hash following the list's current head."""
        head = await self.store.fetchone(
            "SELECT seq, hash FROM optin_events WHERE list_id = ? ORDER BY seq DESC LIMIT 1",
            (list_id,),
        )
        seq, prev = (head[0], head[1]) if head else (0, GENESIS)
        chained: list[Event] = []
        for e in events:
            seq += 1
            e = replace(e, list_id=list_id, seq=seq, prev_hash=prev)
            e = replace(e, hash=row_hash(e, prev))
            chained.append(e)
            prev = e.hash
        return chained

    # ------------------------------------------------------------------ reading

    async def events_for(self, address: str, list_id: str | None = None) -> list[Event]:
        if list_id:
            rows = await self.store.fetchall(
                _SELECT + " WHERE address = ? AND list_id = ? ORDER BY list_id, seq",
                (address.lower(), list_id),
            )
        else:
            rows = await self.store.fetchall(
                _SELECT + " WHERE address = ? ORDER BY list_id, seq", (address.lower(),)
            )
        return [_row(r) for r in rows]

    async def events_of_list(
        self, list_id: str, after_seq: int = 0, limit: int = 10000
    ) -> list[Event]:
        rows = await self.store.fetchall(
            _SELECT + " WHERE list_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (list_id, after_seq, limit),
        )
        return [_row(r) for r in rows]

    async def fold_rows(self, last_id: int, limit: int = 50000) -> list[tuple]:
        """(id, list_id, seq, ts, address, event, channel, token_hash, message_id,
        consent_hash, detail) newer than last_id: what the daemon's cache needs, undecoded."""
        return await self.store.fetchall(
            "SELECT id, list_id, seq, ts, address, event, channel, token_hash, message_id, "
            "consent_hash, detail FROM optin_events WHERE id > ? ORDER BY id LIMIT ?",
            (last_id, limit),
        )

    async def chain_rows(self, list_id: str, after_seq: int = 0, limit: int = 10000) -> list[tuple]:
        """Rows as stored, for Verifier.feed_row: no decoding, for speed."""
        return await self.store.fetchall(
            f"SELECT {', '.join(EVENT_COLUMNS[1:])} FROM optin_events WHERE list_id = ? "
            "AND seq > ? ORDER BY seq LIMIT ?",
            (list_id, after_seq, limit),
        )

    async def count_requests(self, list_id: str, address: str, since: float) -> int:
        """Requests since `since` for the address's mailbox under any +tag: bob@,
        bob+1@, bob+2@ are one mailbox to subscription bombing (max_requests)."""
        box = mailbox(address.lower())
        local, _, domain = box.rpartition("@")
        # every "local+..." sorts between "local+" and "local," ("," follows "+") in
        # byte order: SQLite's, and PostgreSQL's under COLLATE "C" (a locale's collation
        # may ignore punctuation)
        c = ' COLLATE "C"' if self.store.dialect == "postgresql" else ""
        rows = await self.store.fetchall(
            f"SELECT address FROM optin_events WHERE (address = ? OR (address{c} > ? AND "
            f"address{c} < ?)) AND list_id = ? AND event = ? AND ts >= ?",
            (box, local + "+", local + ",", list_id, str(Kind.REQUEST), iso(since)),
        )
        return sum(1 for (a,) in rows if mailbox(a) == box)

    async def chain_ids(self) -> list[str]:
        rows = await self.store.fetchall(
            "SELECT list_id FROM optin_heads UNION SELECT DISTINCT list_id FROM optin_events"
        )
        return sorted(r[0] for r in rows)

    async def head(self, list_id: str) -> tuple[int, str] | None:
        row = await self.store.fetchone(
            "SELECT seq, hash FROM optin_heads WHERE list_id = ?", (list_id,)
        )
        return (int(row[0]), str(row[1])) if row else None

    async def raw(self, sha256: str) -> bytes | None:
        row = await self.store.fetchone("SELECT data FROM optin_raw WHERE sha256 = ?", (sha256,))
        return unpack(row[0]) if row else None

    async def raw_page(self, after_id: int, limit: int = 200) -> list[tuple[int, str, str]]:
        return [
            (int(i), str(s), str(d))
            for i, s, d in await self.store.fetchall(
                "SELECT id, sha256, data FROM optin_raw WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            )
        ]

    async def consent_text(self, h: str) -> str | None:
        row = await self.store.fetchone("SELECT text FROM optin_consent_texts WHERE hash = ?", (h,))
        return str(row[0]) if row else None

    # ------------------------------------------------------------------ lists

    async def stored_lists(self) -> list[ListConfig]:
        rows = await self.store.fetchall(
            "SELECT id, customer, owner, domain, name, return_paths, unsubscribe, consent_text "
            "FROM optin_lists ORDER BY id"
        )
        return [
            ListConfig(
                id=i,
                customer=c,
                owner=o,
                domain=d,
                name=n,
                return_paths=tuple(json.loads(rp)),
                unsubscribe=tuple(json.loads(u)),
                consent_text=t,
            )
            for i, c, o, d, n, rp, u, t in rows
        ]

    async def register_list(self, lst: ListConfig, actor: str, *, replace: bool = False) -> None:
        sql = (
            "INSERT INTO optin_lists(id, customer, owner, domain, name, return_paths, "
            "unsubscribe, consent_text, created, actor) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        if replace:
            sql += (
                " ON CONFLICT(id) DO UPDATE SET customer = excluded.customer, owner = "
                "excluded.owner, domain = excluded.domain, name = excluded.name, "
                "return_paths = excluded.return_paths, unsubscribe = excluded.unsubscribe, "
                "consent_text = excluded.consent_text, actor = excluded.actor"
            )
        await self.store.execute(
            sql,
            (
                lst.id,
                lst.customer,
                lst.owner,
                lst.domain,
                lst.name,
                json.dumps(list(lst.return_paths)),
                json.dumps(list(lst.unsubscribe)),
                lst.consent_text,
                now_iso(),
                actor,
            ),
        )
        await self.put_consent_text(lst.consent_text)

    async def unregister_list(self, list_id: str) -> bool:
        return await self.store.execute("DELETE FROM optin_lists WHERE id = ?", (list_id,)) > 0

    # ------------------------------------------------------------------ counts

    async def add_delivered(self, rows: list[tuple[str, int, int]]) -> None:
        await self.store.executemany(
            "INSERT INTO optin_delivered(list_id, hour, n) VALUES (?, ?, ?) "
            "ON CONFLICT(list_id, hour) DO UPDATE SET n = optin_delivered.n + excluded.n",
            rows,
        )

    async def delivered_since(self, hour: int) -> list[tuple[str, int, int]]:
        return [
            (str(a), int(b), int(c))
            for a, b, c in await self.store.fetchall(
                "SELECT list_id, hour, n FROM optin_delivered WHERE hour >= ?", (hour,)
            )
        ]
