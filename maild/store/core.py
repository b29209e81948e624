"""The core schema: the decision log, written in batches off the hot path.

Every SMTP decision is one row. The proxy never awaits a database write per message:
it hands rows to :class:`DecisionLog`, which flushes them every half second (or every
500 rows) from a background task. A failed flush is retried with the next batch and is
logged once per outage; rows beyond a bound are dropped with a count, because the syslog
line, written synchronously, is the decision's record of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import socket
import time
from dataclasses import dataclass

from maild.store.base import Store, StoreError

# The core schema, in order (maild.components hands it to the store).
MIGRATIONS = (
    """
    CREATE TABLE decisions (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        session TEXT NOT NULL,
        stage TEXT NOT NULL,
        action TEXT NOT NULL,
        code INTEGER NOT NULL,
        status TEXT NOT NULL,
        reason TEXT NOT NULL,
        rule TEXT NOT NULL,
        client_name TEXT NOT NULL,
        client_addr TEXT NOT NULL,
        customer TEXT NOT NULL,
        sender TEXT NOT NULL,
        recipient TEXT NOT NULL,
        size INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX decisions_ts ON decisions(ts);
    CREATE INDEX decisions_customer_ts ON decisions(customer, ts);
    """,
    """
    CREATE TABLE heartbeat (
        node TEXT PRIMARY KEY,
        ts REAL NOT NULL
    );
    """,
)

log = logging.getLogger("maild.store")


@dataclass(frozen=True, slots=True)
class DecisionRow:
    ts: float
    session: str
    stage: str
    action: str
    code: int
    status: str
    reason: str
    rule: str
    client_name: str
    client_addr: str
    customer: str
    sender: str
    recipient: str
    size: int = 0


COLUMNS = tuple(DecisionRow.__dataclass_fields__)
# A row's values in column order: dataclasses.astuple deep-copies every field, and the
# fields are all str, int or float.
_values = operator.attrgetter(*COLUMNS)
_INSERT = f"INSERT INTO decisions({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class DecisionLog:
    """Buffered, batched writer of decision rows."""

    def __init__(
        self, store: Store, *, interval: float = 0.5, batch: int = 500, max_pending: int = 100_000
    ):
        self.store = store
        self.interval = interval
        self.batch = batch
        self.max_pending = max_pending
        self.pending: list[DecisionRow] = []
        self.dropped = 0
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        # While the store fails, retries (and their log lines) back off to once every 30 s.
        self.retry_delay = 0.0

    def add(self, row: DecisionRow) -> None:
        if len(self.pending) >= self.max_pending:
            self.dropped += 1
            return
        self.pending.append(row)
        if len(self.pending) >= self.batch:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            if self.retry_delay:
                await asyncio.sleep(self.retry_delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        rows, self.pending = self.pending, []
        try:
            await self.store.executemany(_INSERT, [_values(r) for r in rows])
        except StoreError as e:
            if not self.retry_delay:  # once per outage, and the cause only if health did not
                health = getattr(self.store, "health", None)
                cause = "" if health is not None and not health.ok else f": {e}"
                log.error(
                    "decision log: cannot write %d rows, will retry until it can%s",
                    len(rows),
                    cause,
                )
            self.retry_delay = min(max(self.retry_delay * 2, self.interval), 30.0)
            self.pending[:0] = rows[: self.max_pending - len(self.pending)]
        except Exception as e:  # rows no retry can write: drop them, keep the writer alive
            log.error(
                "decision log: cannot write %d rows, dropped: %s: %s",
                len(rows),
                type(e).__name__,
                e,
            )
        else:
            if self.retry_delay:
                log.info("decision log: store writable again, %d rows written", len(rows))
            self.retry_delay = 0.0
        if self.dropped:
            log.error(
                "decision log: %d rows dropped (store unavailable for too long)", self.dropped
            )
            self.dropped = 0

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
        if self.pending:
            log.error(
                "decision log: %d rows not written at stop (the store takes no writes); "
                "syslog has a line for each decision",
                len(self.pending),
            )


async def heartbeat(store: Store, node: str = socket.gethostname()) -> None:
    """One small write: how the daemon learns whether the store takes writes, when
    nothing else wrote lately (and, while it fails, when it works again)."""
    await store.execute(
        "INSERT INTO heartbeat(node, ts) VALUES (?, ?) ON CONFLICT(node) "
        "DO UPDATE SET ts = excluded.ts",
        (node, time.time()),
    )


async def recent_decisions(
    store: Store,
    *,
    since: float | None = None,
    limit: int = 100,
    customer: str | None = None,
    action: str | None = None,
    rule: str | None = None,
    address: str | None = None,
) -> list[dict]:
    """Newest first; every filter optional. `address` matches sender or recipient."""
    where: list[str] = []
    params: list[str | float] = []
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    for col, val in (("customer", customer), ("action", action), ("rule", rule)):
        if val:
            where.append(f"{col} = ?")
            params.append(val)
    if address:
        where.append("(lower(sender) = lower(?) OR lower(recipient) = lower(?))")
        params += [address, address]
    sql = f"SELECT {', '.join(COLUMNS)} FROM decisions"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    params.append(limit)
    rows = await store.fetchall(sql, params)
    return [dict(zip(COLUMNS, r, strict=True)) for r in rows]


def now() -> float:
    return time.time()
