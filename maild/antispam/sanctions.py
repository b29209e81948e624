"""Sanctions: strikes from any rule family, a warn-then-block ladder, and notices.

The sources: "For a first offence, education, in the form of a warning may be used";
then "CT Production will block the mail services of any customer found to be sending
such mail". A *strike* is one offence: refusals by the same rule for the same customer
within `cooldown` are one strike (a client's automatic retries are not new offences).
The ladder (default: warn, block) is walked by the number of strikes within `window`
since the customer was last unblocked.

Every state change is one syslog line and an append-only row (who, why, when). The CLI
writes to the same store and leaves a row in `control`; every daemon polls it every two
seconds (so other nodes on the same PostgreSQL see it), and `maild customer
block/unblock` and `maild ratelimit reset` also signal the daemon on their node, which
polls at once (maild.daemonctl).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from maild.config import Reader
from maild.log import clean
from maild.store.base import Store, StoreError

log = logging.getLogger("maild.sanctions")

# The sanctions schema, in order (maild.components hands it to the store).
MIGRATIONS = (
    """
    CREATE TABLE sanctions (
        customer TEXT PRIMARY KEY,
        state TEXT NOT NULL,            -- ok, warned, blocked
        since REAL NOT NULL,
        reason TEXT NOT NULL,
        actor TEXT NOT NULL,
        cleared REAL NOT NULL DEFAULT 0 -- strikes before this time no longer count
    );
    CREATE TABLE strikes (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        customer TEXT NOT NULL,
        rule TEXT NOT NULL,
        reason TEXT NOT NULL,
        session TEXT NOT NULL
    );
    CREATE INDEX strikes_customer_ts ON strikes(customer, ts);
    CREATE TABLE sanction_events (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        customer TEXT NOT NULL,
        action TEXT NOT NULL,           -- strike, warn, block, unblock, notify, notify-failed
        reason TEXT NOT NULL,
        actor TEXT NOT NULL
    );
    CREATE TABLE control (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        arg TEXT NOT NULL
    );
    """,
)

LADDER_STEPS = ("warn", "block")
CONTROL_LOOKBACK = 1000  # ids below the highest seen that may still appear (late commits)


@dataclass(frozen=True)
class SanctionsConfig:
    enabled: bool = True
    ladder: tuple[str, ...] = ("warn", "block")
    window: float = 7 * 86400.0
    cooldown: float = 3600.0
    contact: str = ""  # where blocked customers are told to write; default abuse@first domain
    notify: bool = True
    notify_from: str = ""  # default postmaster@first hosted domain


def parse_sanctions(r: Reader) -> SanctionsConfig:
    d = SanctionsConfig()
    ladder = r.str_list("ladder", d.ladder, lower=True)
    for i, step in enumerate(ladder):
        if step not in LADDER_STEPS:
            r.error(f"ladder[{i}]", step, 'one of "warn", "block"')
    cfg = SanctionsConfig(
        enabled=r.bool("enabled", d.enabled),
        ladder=tuple(s for s in ladder if s in LADDER_STEPS) or d.ladder,
        window=r.duration("window", "7d", positive=True),
        cooldown=r.duration("cooldown", "1h"),
        contact=r.str("contact", ""),
        notify=r.bool("notify", d.notify),
        notify_from=r.str("notify_from", ""),
    )
    r.unknown()
    return cfg


@dataclass(frozen=True, slots=True)
class Block:
    reason: str
    since: float
    actor: str


async def control(store: Store, kind: str, arg: str) -> None:
    """Tell a running daemon (polling the store) that something changed."""
    await store.execute(
        "INSERT INTO control(ts, kind, arg) VALUES (?, ?, ?)", (time.time(), kind, arg)
    )


async def record_event(
    store: Store, customer: str, action: str, reason: str, actor: str, now: float | None = None
) -> None:
    await store.execute(
        "INSERT INTO sanction_events(ts, customer, action, reason, actor) VALUES (?, ?, ?, ?, ?)",
        (now or time.time(), customer, action, reason, actor),
    )


async def set_state(
    store: Store,
    customer: str,
    state: str,
    reason: str,
    actor: str,
    *,
    clear: bool = False,
    now: float | None = None,
) -> None:
    """The one place a customer's state changes: row, event, syslog line, control."""
    now = now or time.time()
    await store.execute(
        "INSERT INTO sanctions(customer, state, since, reason, actor, cleared) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(customer) DO UPDATE SET state=excluded.state, since=excluded.since,"
        " reason=excluded.reason, actor=excluded.actor"
        + (", cleared=excluded.cleared" if clear else ""),
        (customer, state, now, reason, actor, now if clear else 0),
    )
    action = {"ok": "unblock", "warned": "warn", "blocked": "block"}[state]
    await record_event(store, customer, action, reason, actor, now)
    await control(store, "sanctions", customer)
    log.warning(
        'sanction: customer=%s action=%s reason="%s" actor=%s',
        clean(customer),
        action,
        clean(reason, 300),
        clean(actor),
    )


class Sanctions:
    """The daemon's view: blocked customers in memory, strikes written to the store."""

    def __init__(
        self,
        store: Store,
        config_get: Callable[[], object],
        notifier: Callable[[str, str, str, int], Coroutine[Any, Any, None]] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.config_get = config_get
        self.notifier = notifier
        self.clock = clock
        self.blocked: dict[str, Block] = {}
        self.last_strike: dict[tuple[str, str], float] = {}
        self.last_control = 0
        self.applied: set[int] = set()
        self.tasks: set[asyncio.Task] = set()
        self.on_control: list[Callable[[str, str], None]] = []
        # Called when `blocked` changed (with workers: pushed to every worker).
        self.on_change: list[Callable[[], None]] = []

    def _changed(self) -> None:
        for fn in self.on_change:
            fn()

    @property
    def settings(self) -> SanctionsConfig:
        cfg = self.config_get()
        return getattr(cfg, "sections", {}).get("sanctions") or SanctionsConfig()

    async def load(self) -> None:
        rows = await self.store.fetchall(
            "SELECT customer, reason, since, actor FROM sanctions WHERE state = 'blocked'"
        )
        self.blocked = {c: Block(r, s, a) for c, r, s, a in rows}
        self._changed()
        row = await self.store.fetchone("SELECT COALESCE(MAX(id), 0) FROM control")
        if not self.last_control:  # at start: everything so far is already in the state read
            self.last_control = row[0] if row else 0
            rows = await self.store.fetchall(
                "SELECT id FROM control WHERE id > ?",
                (max(0, self.last_control - CONTROL_LOOKBACK),),
            )
            self.applied = {r[0] for r in rows}

    async def poll(self) -> None:
        """Apply what the CLI (or another node) changed since the last poll.

        With several writers (nodes on PostgreSQL) ids are not committed in order: a row
        may become visible after a higher id was already read. So the poll looks back
        over a window of ids and remembers which it applied, instead of trusting
        "everything above the last id seen".
        """
        rows = await self.store.fetchall(
            "SELECT id, kind, arg FROM control WHERE id > ? ORDER BY id",
            (max(0, self.last_control - CONTROL_LOOKBACK),),
        )
        new = [r for r in rows if r[0] not in self.applied]
        if not new:
            return
        for r in new:
            self.applied.add(r[0])
        self.last_control = max(self.last_control, new[-1][0])
        floor = self.last_control - CONTROL_LOOKBACK
        self.applied = {i for i in self.applied if i > floor}
        if any(kind == "sanctions" for _, kind, _ in new):
            await self.load()
        for _, kind, arg in new:
            for fn in self.on_control:
                fn(kind, arg)

    def strike_soon(self, customer: str, rule: str, reason: str, session: str = "") -> None:
        """Called on the hot path: deduplicate in memory, write from a task."""
        s = self.settings
        if not s.enabled:
            return
        now = self.clock()
        last = self.last_strike.get((customer, rule))
        if last is not None and now - last < s.cooldown:
            return
        self.last_strike[(customer, rule)] = now
        task = asyncio.get_running_loop().create_task(
            self._strike(customer, rule, reason, session, now)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _strike(
        self, customer: str, rule: str, reason: str, session: str, now: float
    ) -> None:
        try:
            await self.strike(customer, rule, reason, session=session, now=now)
        except StoreError as e:
            log.error("sanction: customer=%s cannot record strike rule=%s: %s", customer, rule, e)

    async def strike(
        self, customer: str, rule: str, reason: str, *, session: str = "", now: float | None = None
    ) -> str | None:
        """Record one strike and walk the ladder; returns the action taken, if any."""
        s = self.settings
        now = now or self.clock()
        # The cooldown is also checked in the store: with several nodes, each has its own
        # memory, and one offence seen by two nodes is still one strike.
        recent = await self.store.fetchone(
            "SELECT COUNT(*) FROM strikes WHERE customer = ? AND rule = ? AND ts > ?",
            (customer, rule, now - s.cooldown),
        )
        if recent and recent[0]:
            return None
        await self.store.execute(
            "INSERT INTO strikes(ts, customer, rule, reason, session) VALUES (?, ?, ?, ?, ?)",
            (now, customer, rule, reason, session),
        )
        await record_event(self.store, customer, "strike", f"{rule}: {reason}", "maild", now)
        row = await self.store.fetchone(
            "SELECT state, cleared FROM sanctions WHERE customer = ?", (customer,)
        )
        state, cleared = (row[0], row[1]) if row else ("ok", 0.0)
        counted = await self.store.fetchone(
            "SELECT COUNT(*) FROM strikes WHERE customer = ? AND ts >= ? AND ts > ?",
            (customer, now - s.window, cleared or 0.0),
        )
        assert counted is not None  # COUNT(*) without GROUP BY returns one row
        n = counted[0]
        log.warning(
            'sanction: customer=%s action=strike rule=%s strikes=%d reason="%s"',
            clean(customer),
            rule,
            n,
            clean(reason, 300),
        )
        if state == "blocked" or not s.ladder or n < 1:
            return None
        if n > len(s.ladder) and s.ladder[-1] == "warn":
            return None  # warned already for every step of the ladder: no more mail
        step = s.ladder[min(n, len(s.ladder)) - 1]
        days = s.window / 86400
        why = (
            f"{n} offence{'s' if n != 1 else ''} in {days:g} day{'s' if days != 1 else ''}, "
            f"latest: {rule}: {reason}"
        )
        if step == "block":
            await self.block(customer, why, "maild", now=now, strikes=n)
        else:
            await self.warn(customer, why, "maild", now=now, strikes=n)
        return step

    async def warn(
        self, customer: str, reason: str, actor: str, *, now: float | None = None, strikes: int = 0
    ) -> None:
        await set_state(self.store, customer, "warned", reason, actor, now=now)
        await self._notify(customer, "warn", reason, strikes)

    async def block(
        self, customer: str, reason: str, actor: str, *, now: float | None = None, strikes: int = 0
    ) -> None:
        await set_state(self.store, customer, "blocked", reason, actor, now=now)
        self.blocked[customer] = Block(reason, now or self.clock(), actor)
        self._changed()
        await self._notify(customer, "block", reason, strikes)

    async def unblock(self, customer: str, actor: str, reason: str = "unblocked") -> None:
        await set_state(self.store, customer, "ok", reason, actor, clear=True, now=self.clock())
        self.blocked.pop(customer, None)
        self._changed()

    async def _notify(self, customer: str, action: str, reason: str, strikes: int) -> None:
        if self.notifier is None or not self.settings.notify:
            return
        task = asyncio.get_running_loop().create_task(
            self.notifier(customer, action, reason, strikes)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drain(self) -> None:
        if self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
