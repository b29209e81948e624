"""The ledger on a real SQLite store: append-only chains, even with two writers."""

from __future__ import annotations

import asyncio

import pytest

from maild.components import open_store
from maild.optin.evidence import verify_all
from maild.optin.ledger import Ledger
from maild.optin.model import Kind
from maild.optin.settings import ListConfig
from maild.store.base import StoreError


async def test_append_builds_a_chain_per_list(ledger):
    a = await ledger.append(
        list_id="a.example",
        address="X@Example.org",
        kind=Kind.REQUEST,
        channel="web",
        ip="192.0.2.1",
        detail={"b": 2, "a": [1]},
        consent_text="Consent A",
    )
    b = await ledger.append(
        list_id="a.example", address="x@example.org", kind=Kind.CONFIRM, channel="email"
    )
    c = await ledger.append(
        list_id="b.example", address="x@example.org", kind=Kind.REQUEST, channel="api"
    )
    assert (a.seq, b.seq, c.seq) == (1, 2, 1)
    assert a.address == "x@example.org" and b.prev_hash == a.hash and a.detail == {"a": [1], "b": 2}
    assert await ledger.head("a.example") == (2, b.hash)
    assert await ledger.consent_text(a.consent_hash) == "Consent A"
    assert [e.kind for e in await ledger.events_for("x@example.org")] == [
        Kind.REQUEST,
        Kind.CONFIRM,
        Kind.REQUEST,
    ]
    assert [e.seq for e in await ledger.events_for("x@example.org", "b.example")] == [1]
    assert (await verify_all(ledger)).ok


async def test_two_writers_never_fork_a_chain(tmp_path):
    path = str(tmp_path / "s.db")
    s1, s2 = await open_store(path), await open_store(path)
    try:
        l1, l2 = Ledger(s1), Ledger(s2)

        async def write(ledger: Ledger, who: str) -> None:
            for i in range(25):
                await ledger.append(
                    list_id="l.example",
                    address=f"{who}{i}@x.example",
                    kind=Kind.REQUEST,
                    channel="api",
                )

        await asyncio.gather(write(l1, "a"), write(l2, "b"))
        events = await l1.events_of_list("l.example")
        assert [e.seq for e in events] == list(range(1, 51))
        assert (await verify_all(l1)).ok
    finally:
        await s1.close()
        await s2.close()


async def test_raw_messages_are_stored_once_and_compressed(ledger, store):
    raw = b"Received: from x\r\nSubject: hi\r\n\r\n" + b"body line\r\n" * 500
    e1 = await ledger.append(
        list_id="l.example", address="a@x.example", kind=Kind.REQUEST, channel="web", raw=raw
    )
    e2 = await ledger.append(
        list_id="l.example", address="b@x.example", kind=Kind.REQUEST, channel="web", raw=raw
    )
    assert e1.raw_sha256 == e2.raw_sha256 and await ledger.raw(e1.raw_sha256) == raw
    size, stored = await store.fetchone("SELECT size, length(data) FROM optin_raw")
    assert size == len(raw) and stored < len(raw) / 5


async def test_lists_in_the_store(ledger):
    lst = ListConfig(
        id="x.acme.example",
        customer="acme",
        owner="x@acme.example",
        consent_text="X",
        domain="lists.acme.example",
        return_paths=("x-bounces+*@lists.acme.example",),
    )
    await ledger.register_list(lst, "cli:root")
    with pytest.raises(StoreError):
        await ledger.register_list(lst, "cli:root")
    await ledger.register_list(
        ListConfig(**{**lst.__dict__, "owner": "y@acme.example"}), "cli:root", replace=True
    )
    assert [(x.id, x.owner, x.return_paths) for x in await ledger.stored_lists()] == [
        ("x.acme.example", "y@acme.example", ("x-bounces+*@lists.acme.example",))
    ]
    assert await ledger.unregister_list("x.acme.example")
    assert not await ledger.unregister_list("x.acme.example")


async def test_delivered_counts_add_up(ledger):
    await ledger.add_delivered([("l.example", 10, 5), ("l.example", 11, 1)])
    await ledger.add_delivered([("l.example", 10, 2)])
    assert sorted(await ledger.delivered_since(10)) == [("l.example", 10, 7), ("l.example", 11, 1)]
    assert await ledger.delivered_since(11) == [("l.example", 11, 1)]


async def test_requests_are_counted_per_address(ledger):
    for _ in range(2):
        await ledger.append(
            list_id="l.example", address="a@x.example", kind=Kind.REQUEST, channel="web"
        )
    assert await ledger.count_requests("l.example", "A@x.example", 0) == 2
    assert await ledger.count_requests("l.example", "b@x.example", 0) == 0


def _append_from_a_process(path: str, who: str, n: int, start: float) -> None:
    """One writer process (as one of `[server] workers`): n appends to one list."""
    import time

    async def run() -> None:
        store = await open_store(path)
        try:
            ledger = Ledger(store)
            time.sleep(max(0.0, start - time.time()))  # every process begins at once
            for i in range(n):
                await ledger.append(
                    list_id="l.example",
                    address=f"{who}{i}@x.example",
                    kind=Kind.REQUEST,
                    channel="api",
                )
        finally:
            await store.close()

    asyncio.run(run())


async def test_writers_in_several_processes_never_fork_a_chain(tmp_path):
    """Workers are processes, each with its own SQLite connection: their appends queue on
    SQLite's write lock (BEGIN IMMEDIATE) and the chain stays one line."""
    import multiprocessing
    import time

    path = str(tmp_path / "s.db")
    first = await open_store(path)  # creates the schema before the writers start
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 2.0
    procs = [
        ctx.Process(target=_append_from_a_process, args=(path, f"w{k}-", 25, start))
        for k in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        await asyncio.to_thread(p.join, 120)
    try:
        assert [p.exitcode for p in procs] == [0] * 4
        ledger = Ledger(first)
        events = await ledger.events_of_list("l.example")
        assert [e.seq for e in events] == list(range(1, 101))
        assert len({e.address for e in events}) == 100
        assert all(b.prev_hash == a.hash for a, b in zip(events, events[1:], strict=False))
        assert (await verify_all(ledger)).ok
    finally:
        await first.close()
