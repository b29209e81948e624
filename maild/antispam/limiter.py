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

One counter per key *and window*: a check (name, key, rate, n) counts at
`counter_key(key, rate)`, e.g. `cust:acme#1h` and `cust:acme#1d` for ["200/1h",
"2000/1d"], so each limit counts a message once and decays over its own period. A key
stored without a window (by a maild that kept one counter for all of a key's windows,
charging it once per window) is carried over when that key is next checked: each of its
k windows starts from the old value / k with the old timestamp (see `_adopt`).

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

import asyncio
import functools
import logging
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

log = logging.getLogger("maild.ratelimit")

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?[bB]?)\s*/\s*(\d*)\s*(s|m|h|d|w)\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
}


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

    @property
    def window(self) -> str:
        """The period in its largest whole unit: 3600 -> '1h', 5400 -> '90m'."""
        return _window(self.period)


@functools.lru_cache(maxsize=256)  # a few periods, asked for every counter of every message
def _window(period: float) -> str:
    for unit in "wdhm":
        if period % _UNIT[unit] == 0:
            return f"{int(period // _UNIT[unit])}{unit}"
    return f"{int(period)}s"


_WINDOW = re.compile(r"#\d+[smhdw]$")


def counter_key(key: str, rate: Rate) -> str:
    """The counter for key over rate's window: 'cust:acme' + 200/1h -> 'cust:acme#1h'."""
    return f"{key}#{rate.window}"


def base_key(key: str) -> str:
    """A counter key without its window: 'cust:acme|rcpts#1d' -> 'cust:acme|rcpts'."""
    return _WINDOW.sub("", key)


def under(key: str, prefix: str) -> bool:
    """Does a reset of prefix clear this counter? The key itself, with any window, and
    the keys under it ('cust:acme' clears 'cust:acme#1h' and 'cust:acme|rcpts#1d');
    a prefix with a window ('cust:acme#1h') clears that one counter."""
    b = base_key(key)
    return key == prefix or b == prefix or b.startswith((prefix + ":", prefix + "|"))


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


def legacy_share(value: float, ts: float, k: int) -> Counter:
    """A window's share of a counter stored before per-window counting, which was
    charged once for each of its k windows."""
    return Counter(value=value / max(k, 1), ts=ts)


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
    rid: int = 0  # with workers: the supervisor's reservation it stands for (maild.workers)


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
    "RETURNING key, value, ts"
)


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
        # Counters stored without a window (value, ts, period), until their key is next
        # checked; shared mode: the windows' shares not yet in the store, and the old
        # rows to delete once they are.
        self.legacy: dict[str, tuple[float, float, float]] = {}
        self.seeds: dict[str, tuple[float, float, float]] = {}
        self.adopted: set[str] = set()
        self._sync_lock = asyncio.Lock()

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
        self._adopt([("", key, rate, n)])
        c = self.counters.get(counter_key(key, rate))
        if c is None:
            return None if n <= rate.limit else rate.period
        cur = c.current(self.clock(), rate.period)
        if cur + c.pending + n <= rate.limit:
            return None
        return seconds_until_free(cur, c.pending, n, rate)

    async def check_async(self, key: str, rate: Rate, n: float = 1.0) -> float | None:
        """check(), as a worker's limiter answers it (maild.workers.shared)."""
        return self.check(key, rate, n)

    def reserve(self, res: Reservation, key: str, rate: Rate, n: float = 1.0) -> None:
        key = counter_key(key, rate)
        c = self.counters.get(key)
        if c is None:
            if len(self.counters) >= self.max_keys:
                self.expire()
            c = self.counters[key] = Counter(ts=self.clock())
        c.pending += n
        self.periods[key] = rate.period
        res.items.append((key, n, rate.period))

    def try_reserve(
        self, res: Reservation, checks: list[tuple[str, str, Rate, float]]
    ) -> Over | None:
        """Check every (name, key, rate, n) first; reserve all only if all fit. Two rates
        of one key with the same period are one counter, charged once."""
        self._adopt(checks)
        for name, key, rate, n in checks:
            wait = self.check(key, rate, n)
            if wait is not None:
                return Over(name, counter_key(key, rate), rate, wait)
        charged = set()
        for _name, key, rate, n in checks:
            if (counter_key(key, rate), n) not in charged:
                charged.add((counter_key(key, rate), n))
                self.reserve(res, key, rate, n)
        return None

    async def try_reserve_async(
        self, res: Reservation, checks: list[tuple[str, str, Rate, float]]
    ) -> Over | None:
        """try_reserve, after a round trip for the keys whose local allowance cannot serve
        (shared mode only; a StoreError propagates and the caller tempfails)."""
        if self.shared is not None:
            self._adopt(checks)
            need = []
            for _name, key, rate, n in checks:
                key = counter_key(key, rate)
                c = self.counters.get(key)
                if not self._allowed(key, rate, n, c.pending if c else 0.0):
                    need.append(key)
            if need:
                await self.sync(self.shared, need)
        return self.try_reserve(res, checks)

    def _adopt(self, checks: list[tuple[str, str, Rate, float]]) -> None:
        """Carry counters stored without a window over to the windows checked now: each of
        a key's k rates was charged at the one old counter, so each window starts from a
        k-th of it, with its timestamp. The same share on every node, and shared mode
        inserts it only where no node has yet (ON CONFLICT DO NOTHING): counted once."""
        if not self.legacy:
            return
        rates: dict[str, list[Rate]] = {}
        for _name, key, rate, _n in checks:
            if key in self.legacy and rate not in rates.setdefault(key, []):
                rates[key].append(rate)
        for key, mine in rates.items():
            value, ts, _period = self.legacy.pop(key)
            for rate in mine:
                ck = counter_key(key, rate)
                if ck in self.counters:
                    continue
                seed = self.counters[ck] = legacy_share(value, ts, len(mine))
                self.periods[ck] = rate.period
                if self.shared is None:
                    self.dirty.add(ck)
                else:
                    self.seeds[ck] = (seed.value, seed.ts, rate.period)
            (self.dirty if self.shared is None else self.adopted).add(key)  # the old row goes

    async def sync(self, store: Store, keys: list[str] | None = None) -> int:
        """Shared mode: add this node's unsynced increments to the global counters and
        read them back, atomically per key (one statement); keys=None syncs every key
        with unsynced increments.

        One sync at a time: a sync takes the unsynced increments when it starts and
        subtracts them when it returns, so two at once (concurrent sessions past their
        allowance) would both send the same increments, and the counter would grow by
        more than was admitted."""
        async with self._sync_lock:
            return await self._sync(store, keys)

    async def _sync(self, store: Store, keys: list[str] | None) -> int:
        if keys is None:
            keys = [k for k, d in self.delta.items() if d > 0] + list(self.seeds)
        keys = sorted(set(keys))  # one lock order on every node: no deadlocks
        if not keys:
            return 0
        await self._store_seeds(store, keys)
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

    async def _store_seeds(self, store: Store, keys: list[str]) -> None:
        """Shared mode: the carried-over shares of keys, where no node stored them yet;
        then, all carried over, the old rows go."""
        seeds = [(k, *self.seeds[k]) for k in keys if k in self.seeds]
        try:
            if seeds:
                await store.executemany(
                    "INSERT INTO ratelimit_counters(key, value, ts, period) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(key) DO NOTHING",
                    seeds,
                )
                for k, *_ in seeds:
                    del self.seeds[k]
            if self.adopted and not self.seeds:
                await store.executemany(
                    "DELETE FROM ratelimit_counters WHERE key = ?",
                    [(k,) for k in sorted(self.adopted)],
                )
                self.adopted.clear()
        except StoreError:
            self.healthy = False
            raise

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

    def value(self, key: str, rate: Rate) -> float:
        """The count at key over rate's window."""
        key = counter_key(key, rate)
        c = self.counters.get(key)
        return 0.0 if c is None else c.current(self.clock(), self.periods.get(key, 0.0))

    def _drop(self, gone: list[str]) -> int:
        for k in gone:
            self.counters.pop(k, None)
            self.periods.pop(k, None)
            self.legacy.pop(k, None)
            self.seeds.pop(k, None)
            self.dirty.add(k)
        return len(gone)

    def reset(self, prefix: str) -> int:
        """Drop the counters under prefix (see `under`), every window; returns how many."""
        return self._drop([k for k in [*self.counters, *self.legacy] if under(k, prefix)])

    def expire(self) -> int:
        now = self.clock()
        return self._drop(
            [
                k
                for k, c in self.counters.items()
                if c.pending <= 0 and c.current(now, self.periods.get(k, 0.0)) <= 0.0
            ]
            + [
                k
                for k, (v, ts, p) in self.legacy.items()
                if Counter(value=v, ts=ts).current(now, p) <= 0.0
            ]
        )

    # ------------------------------------------------------------------ persistence

    async def load(self, store: Store) -> int:
        now = self.clock()
        rows = await store.fetchall("SELECT key, value, ts, period FROM ratelimit_counters")
        for key, value, ts, period in rows:
            c = Counter(value=value, ts=ts)
            if c.current(now, period) <= 0:
                continue
            if base_key(key) == key:
                self.legacy[key] = (value, ts, period)
            else:
                self.counters[key] = c
                self.periods[key] = period
        if self.legacy:
            log.warning(
                "ratelimit: legacy counters=%d (stored with one counter for all of a "
                "key's windows): each window starts from its share when its key is "
                "next checked",
                len(self.legacy),
            )
        return len(self.counters) + len(self.legacy)

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
                    "period=excluded.period",
                    upserts,
                )
            if deletes:
                await store.executemany("DELETE FROM ratelimit_counters WHERE key = ?", deletes)
        except Exception:
            self.dirty |= keys
            raise
        return len(keys)
