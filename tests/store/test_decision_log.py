"""The decision log's retry: rows kept while the store fails, retries backing off."""

from __future__ import annotations

import asyncio
import dataclasses

from maild.store.base import StoreError
from maild.store.core import DecisionLog, DecisionRow


class FlakyStore:
    """Pure stand-in for a store whose writes fail until `healthy` is set."""

    def __init__(self) -> None:
        self.healthy = False
        self.written: list[tuple] = []
        self.attempts = 0

    async def executemany(self, sql: str, rows: list[tuple]) -> None:
        self.attempts += 1
        if not self.healthy:
            raise StoreError("database is locked")
        self.written += rows


def row(n: int) -> DecisionRow:
    return DecisionRow(
        ts=float(n),
        session=f"S{n}",
        stage="DATA",
        action="relay",
        code=250,
        status="2.0.0",
        reason="Ok",
        rule="",
        client_name="c",
        client_addr="192.0.2.1",
        customer="",
        sender="a@x.example",
        recipient="b@y.example",
    )


def test_failures_back_off_to_30s_and_recovery_writes_each_row_once(caplog) -> None:
    caplog.set_level("INFO", logger="maild.store")

    async def go() -> None:
        store = FlakyStore()
        log = DecisionLog(store, interval=0.5)  # type: ignore[arg-type]
        log.add(row(1))
        delays = []
        for _ in range(9):
            await log.flush()
            delays.append(log.retry_delay)
        assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
        log.add(row(2))
        store.healthy = True
        await log.flush()
        assert log.retry_delay == 0 and not log.pending
        assert [r[1] for r in store.written] == ["S1", "S2"]

    asyncio.run(go())
    # the outage is logged once, not at every retry, and its end once
    assert caplog.text.count("decision log: cannot write") == 1, caplog.text
    assert caplog.text.count("store writable again") == 1, caplog.text


def test_while_backing_off_a_full_batch_does_not_retry_at_once() -> None:
    async def go() -> int:
        store = FlakyStore()
        log = DecisionLog(store, interval=0.05, batch=2)  # type: ignore[arg-type]
        log.start()
        for n in range(40):  # 20 full batches, each of which would wake the writer
            log.add(row(n))
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        store.healthy = True
        attempts = store.attempts
        log._task.cancel()  # type: ignore[union-attr]
        await log.flush()
        assert len(store.written) == 40
        return attempts

    # without back-off each full batch would be a failed attempt (about 20 or more)
    assert asyncio.run(go()) <= 6


def test_a_row_no_retry_can_write_is_dropped_and_the_writer_goes_on(caplog) -> None:
    class Unencodable(FlakyStore):
        async def executemany(self, sql: str, rows: list[tuple]) -> None:
            if any("\udcff" in str(v) for r in rows for v in r):
                raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")
            self.written += rows

    async def go() -> Unencodable:
        store = Unencodable()
        log = DecisionLog(store)  # type: ignore[arg-type]
        bad = dataclasses.replace(row(1), sender="\udcff@x.example")
        log.add(bad)
        await log.flush()
        log.add(row(2))
        await log.flush()
        assert log.retry_delay == 0 and not log.pending
        return store

    store = asyncio.run(go())
    assert [r[1] for r in store.written] == ["S2"]
    assert "1 rows, dropped: UnicodeEncodeError" in caplog.text
