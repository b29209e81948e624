"""Rate-limit counters: O(1) decaying counters with reservations, persisted in batches.

The counter is policyd v2's decaying counter: at each update the stored value decays
linearly with the time since the last update, `cur = 0 if elapsed >= period else
(1 - elapsed/period) * value`, which approximates a sliding window with two numbers.

Mail is charged only when the downstream accepted it: a transaction *reserves* what it
would add (pending), and commits the reservation after the 250, or releases it on any
refusal or abort (rspamd's pending reservation, without rspamd#4467's leak: a
Reservation releases itself unless committed). Counters live in memory; dirty ones
are written to the store every few seconds, never per message, and loaded at start,
so they survive a restart. Counters that have decayed to zero are dropped.

Shared counters (several nodes on one PostgreSQL, `share()`): each node sends the
increments it committed since its last sync as one atomic UPSERT that decays the stored
value and adds them in SQL (no lost increments between nodes), and reads back the global
value. Between syncs a node admits, without a round trip, at most a *local allowance*
per key: `max(ALLOWANCE x (limit - global value at the last sync), one charge)`. Past
it, `try_reserve_async` syncs the keys first (one round trip). So N nodes together admit
at most N x max(ALLOWANCE x limit, largest single charge) over a limit; docs/scale-out.md.
The allowance is void while the store is failing: then every check needs a round trip,
which fails, and the message is tempfailed, never accepted unchecked.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from maild.store.base import Store, StoreError

# The ratelimit schema, in order (maild.components hands it to the store).
MIGRATIONS = (
    """
    CREATE TABLE ratelimit_counters (
        key TEXT PRIMARY KEY,
        value REAL NOT NULL,
        ts REAL NOT NULL,
        period REAL NOT NULL
    );
    """,
)

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?[bB]?)\s*/\s*(\d*)\s*(s|m|h|d|w)\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3,
         "gb": 1024**3}


@dataclass(frozen=True, slots=True)
class Rate:
    """'200/1h' -> Rate(200, 3600). Sizes are allowed for byte limits: '500MB/1h'."""

    limit: float
    period: float
    text: str

    @classmethod
    def parse(cls, text: str) -> Rate:
        m = _RATE.match(text)
        if not m:
            raise ValueError(text)
        n = float(m.group(1)) * _SIZE[m.group(2).lower()]
        period = (int(m.group(3)) if m.group(3) else 1) * _UNIT[m.group(4)]
        if period <= 0:
            raise ValueError(text)
        return cls(n, float(period), text.strip())


@dataclass(slots=True)
class Counter:
    value: float = 0.0
    ts: float = 0.0
    pending: float = 0.0

    def current(self, now: float, period: float) -> float:
        elapsed = now - self.ts
        if period <= 0 or elapsed >= period:
            return 0.0
        return self.value * (1.0 - max(elapsed, 0.0) / period)


def seconds_until_free(cur: float, pending: float, n: float, rate: Rate) -> float:
    """When cur (decaying linearly to 0 over the period) leaves room for n more."""
    room = rate.limit - pending - n
    if room < 0:
        return rate.period
    if cur <= room:
        return 0.0
    return float(math.ceil(rate.period * (1.0 - room / cur) - 1e-6))


@dataclass(frozen=True, slots=True)
class Over:
    """A limit that would be exceeded: its name, the rate, and when it frees up."""

    name: str
    key: str
    rate: Rate
    retry_after: float


@dataclass
class Reservation:
    """What one transaction reserved; commit after the 250, else release."""

    items: list[tuple[str, float, float]] = field(default_factory=list)  # (key, n, period)
    done: bool = False


ALLOWANCE = 0.1  # share of a key's remaining room a node may admit between syncs
ALLOWANCE_TTL = 10.0  # an allowance older than this (seconds) needs a fresh sync

_SYNC = (
    "INSERT INTO ratelimit_counters(key, value, ts, period) VALUES {rows} "
    "ON CONFLICT(key) DO UPDATE SET "
    # A stored period of 0 (a key first written without a rate) must not divide by zero,
    # whatever the clocks of the nodes say: NULLIF makes it NULL, COALESCE makes it 0.
    "value = COALESCE(CASE WHEN excluded.ts - ratelimit_counters.ts >= ratelimit_counters.period "
    "THEN 0 ELSE ratelimit_counters.value * (1 - GREATEST(excluded.ts - ratelimit_counters.ts, 0)"
    " / NULLIF(ratelimit_counters.period, 0)) END, 0) + excluded.value, "
    "ts = GREATEST(excluded.ts, ratelimit_counters.ts), "
    "period = GREATEST(excluded.period, ratelimit_counters.period) "
    "RETURNING key, value, ts")


class Limiter:
    def __init__(self, clock: Callable[[], float] = time.time, max_keys: int = 1_000_000):
        self.clock = clock
        self.max_keys = max_keys
        self.counters: dict[str, Counter] = {}
        self.periods: dict[str, float] = {}
        self.dirty: set[str] = set()
        # shared mode (share()): the store, this node's unsynced commits per key, and the
        # global value (value, ts) read at each key's last sync, with the time of it.
        self.shared: Store | None = None
        self.delta: dict[str, float] = {}
        self.synced: dict[str, tuple[float, float, float]] = {}
        self.healthy = True
        self.round_trips = 0

    def share(self, store: Store) -> None:
        """Share counters with the other nodes through store (PostgreSQL)."""
        self.shared = store

    def _allowed(self, key: str, rate: Rate, n: float, pending: float) -> bool:
        """Shared mode: may this node admit n more at key without a round trip?"""
        if not self.healthy:
            return False
        now = self.clock()
        snap = self.synced.get(key)
        if snap is None:
            return False
        value, ts, at = snap
        if now - at > ALLOWANCE_TTL:
            return False
        g = Counter(value=value, ts=ts).current(now, rate.period)
        allowance = max(ALLOWANCE * max(0.0, rate.limit - g), n)
        return self.delta.get(key, 0.0) + pending + n <= allowance

    def check(self, key: str, rate: Rate, n: float = 1.0) -> float | None:
        """None if n more fit under rate at key, else seconds until they would."""
        c = self.counters.get(key)
        if c is None:
            return None if n <= rate.limit else rate.period
        cur = c.current(self.clock(), rate.period)
        if cur + c.pending + n <= rate.limit:
            return None
        return seconds_until_free(cur, c.pending, n, rate)

    def reserve(self, res: Reservation, key: str, rate: Rate, n: float = 1.0) -> None:
        c = self.counters.get(key)
        if c is None:
            if len(self.counters) >= self.max_keys:
                self.expire()
            c = self.counters[key] = Counter(ts=self.clock())
        c.pending += n
        self.periods[key] = max(self.periods.get(key, 0.0), rate.period)
        res.items.append((key, n, rate.period))

    def try_reserve(self, res: Reservation, checks: list[tuple[str, str, Rate, float]]
                    ) -> Over | None:
        """Check every (name, key, rate, n) first; reserve all only if all fit."""
        for name, key, rate, n in checks:
            wait = self.check(key, rate, n)
            if wait is not None:
                return Over(name, key, rate, wait)
        for _name, key, rate, n in checks:
            self.reserve(res, key, rate, n)
        return None

    async def try_reserve_async(self, res: Reservation, checks: list[tuple[str, str, Rate, float]]
                                ) -> Over | None:
        """try_reserve, after a round trip for the keys whose local allowance cannot serve
        (shared mode only; a StoreError propagates and the caller tempfails)."""
        if self.shared is not None:
            need = []
            for _name, key, rate, n in checks:
                c = self.counters.get(key)
                if not self._allowed(key, rate, n, c.pending if c else 0.0):
                    need.append(key)
            if need:
                await self.sync(self.shared, need)
        return self.try_reserve(res, checks)

    async def sync(self, store: Store, keys: list[str] | None = None) -> int:
        """Shared mode: add this node's unsynced increments to the global counters and
        read them back, atomically per key (one statement); keys=None syncs every key
        with unsynced increments."""
        if keys is None:
            keys = [k for k, d in self.delta.items() if d > 0]
        keys = sorted(set(keys))  # one lock order on every node: no deadlocks
        if not keys:
            return 0
        now = self.clock()
        sent = {k: self.delta.get(k, 0.0) for k in keys}
        params: list[object] = []
        for k in keys:
            params += [k, sent[k], now, self.periods.get(k, 0.0)]
        sql = _SYNC.format(rows=", ".join("(?, ?, ?, ?)" for _ in keys))
        self.round_trips += 1
        try:
            rows = await store.fetchall(sql, params)
        except StoreError:
            self.healthy = False
            raise
        self.healthy = True
        for key, value, ts in rows:
            self.delta[key] = max(0.0, self.delta.get(key, 0.0) - sent.get(key, 0.0))
            if self.delta[key] == 0.0:
                del self.delta[key]
            self.synced[key] = (float(value), float(ts), now)
            c = self.counters.get(key)
            if c is None:
                c = self.counters[key] = Counter()
            c.value, c.ts = float(value) + self.delta.get(key, 0.0), float(ts)
        return len(rows)

    def commit(self, res: Reservation) -> None:
        if res.done:
            return
        res.done = True
        now = self.clock()
        for key, n, period in res.items:
            c = self.counters.get(key)
            if c is None:
                continue
            c.pending = max(0.0, c.pending - n)
            c.value = c.current(now, period) + n
            c.ts = now
            self.dirty.add(key)
            if self.shared is not None:
                self.delta[key] = self.delta.get(key, 0.0) + n

    def release(self, res: Reservation) -> None:
        if res.done:
            return
        res.done = True
        for key, n, _period in res.items:
            c = self.counters.get(key)
            if c is not None:
                c.pending = max(0.0, c.pending - n)

    def value(self, key: str) -> float:
        c = self.counters.get(key)
        return 0.0 if c is None else c.current(self.clock(), self.periods.get(key, 0.0))

    def reset(self, prefix: str) -> int:
        """Drop counters whose key equals prefix or starts with 'prefix:'; returns how many."""
        gone = [k for k in self.counters if k == prefix or k.startswith(prefix + ":")
                or k.startswith(prefix + "|")]
        for k in gone:
            del self.counters[k]
            self.periods.pop(k, None)
            self.dirty.add(k)
        return len(gone)

    def expire(self) -> int:
        now = self.clock()
        gone = [k for k, c in self.counters.items()
                if c.pending <= 0 and c.current(now, self.periods.get(k, 0.0)) <= 0.0]
        for k in gone:
            del self.counters[k]
            self.periods.pop(k, None)
            self.dirty.add(k)
        return len(gone)

    # ------------------------------------------------------------------ persistence

    async def load(self, store: Store) -> int:
        now = self.clock()
        rows = await store.fetchall("SELECT key, value, ts, period FROM ratelimit_counters")
        for key, value, ts, period in rows:
            c = Counter(value=value, ts=ts)
            if c.current(now, period) > 0:
                self.counters[key] = c
                self.periods[key] = period
        return len(self.counters)

    async def flush(self, store: Store) -> int:
        """Write dirty counters (delete the dropped ones); one batch, off the hot path.
        Shared mode: sync the unsynced increments instead (never overwrite other nodes')."""
        if self.shared is not None:
            self.dirty.clear()
            return await self.sync(store)
        if not self.dirty:
            return 0
        keys, self.dirty = self.dirty, set()
        upserts, deletes = [], []
        for k in keys:
            c = self.counters.get(k)
            if c is None:
                deletes.append((k,))
            else:
                upserts.append((k, c.value, c.ts, self.periods.get(k, 0.0)))
        try:
            if upserts:
                await store.executemany(
                    "INSERT INTO ratelimit_counters(key, value, ts, period) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value=excluded.value, ts=excluded.ts, "
                    "period=excluded.period", upserts)
            if deletes:
                await store.executemany("DELETE FROM ratelimit_counters WHERE key = ?", deletes)
        except Exception:
            self.dirty |= keys
            raise
        return len(keys)
