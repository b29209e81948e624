"""The Store interface behaves the same on SQLite and PostgreSQL (every test runs on both)."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from maild.antispam.limiter import Limiter, Rate, Reservation
from maild.antispam.sanctions import Sanctions
from maild.components import WIRING, open_store
from maild.optin.evidence import verify_all
from maild.optin.ledger import Ledger
from maild.optin.model import Kind
from maild.retention import state as rstate
from maild.store import leases
from maild.store.base import StoreError

MIGRATIONS = WIRING.migrations


async def test_migrations_apply_once_and_record_versions(store, state_url):
    versions = await store.schema_versions()
    assert versions == {c: len(s) for c, s in MIGRATIONS.items()}
    again = await open_store(state_url)  # a second node starting: nothing to do, no error
    assert await again.schema_versions() == versions
    await again.close()


async def test_concurrent_opens_migrate_safely(state_url):
    """Nodes starting at once on one PostgreSQL (SQLite: one host, one daemon migrates)."""
    if not state_url.startswith("postgresql://"):
        await (await open_store(state_url)).close()
    stores = await asyncio.gather(*(open_store(state_url) for _ in range(3)))
    for s in stores:
        assert (await s.schema_versions())["core"] == len(MIGRATIONS["core"])
        await s.close()


async def test_execute_fetch_rowcount_and_placeholders(store):
    n = await store.execute("INSERT INTO control(ts, kind, arg) VALUES (?, ?, ?)", (1.5, "k", "a"))
    assert n == 1
    await store.executemany(
        "INSERT INTO control(ts, kind, arg) VALUES (?, ?, ?)", [(2.0, "k", "b"), (3.25, "j", "c")]
    )
    assert await store.fetchall("SELECT id, ts, kind, arg FROM control ORDER BY id") == [
        (1, 1.5, "k", "a"),
        (2, 2.0, "k", "b"),
        (3, 3.25, "j", "c"),
    ]
    assert await store.execute("UPDATE control SET arg = ? WHERE kind = ?", ("z", "k")) == 2
    assert await store.fetchone("SELECT COUNT(*) FROM control WHERE arg = 'z'") == (2,)
    assert await store.fetchone("SELECT arg FROM control WHERE id = ?", (99,)) is None
    # numbered placeholders and a reserved column name (retention's `user`)
    await rstate.record_access(store, [("u@x", 10.0, "imap"), ("u@x", 5.0, "pop3")])
    row = await rstate.mailbox(store, "u@x")
    assert row is not None and (row.last_access, row.access_source) == (10.0, "imap")


async def test_large_integers_and_doubles_round_trip(store):
    await rstate.save_dircache(
        store,
        [
            (
                "/m/cur",
                2**40,
                2**33,
                1_700_000_000_123_456_789,
                1_700_000_000_123_456_789,
                3,
                2**35,
                1.7e9 + 0.25,
                1.0,
            )
        ],
    )
    assert (await rstate.dircache(store))["/m/cur"] == (
        2**40,
        2**33,
        1_700_000_000_123_456_789,
        1_700_000_000_123_456_789,
        3,
        2**35,
        1.7e9 + 0.25,
        1.0,
    )


async def test_transaction_commits_or_rolls_back_together(store):
    with pytest.raises(RuntimeError):
        async with store.transaction():
            await store.execute("INSERT INTO control(ts, kind, arg) VALUES (1, 'a', 'b')")
            raise RuntimeError("boom")
    assert await store.fetchone("SELECT COUNT(*) FROM control") == (0,)
    async with store.transaction():
        await store.xact_lock("x")
        await store.execute("INSERT INTO control(ts, kind, arg) VALUES (1, 'a', 'b')")
    assert await store.fetchone("SELECT COUNT(*) FROM control") == (1,)


async def test_errors_are_store_errors(store):
    with pytest.raises(StoreError):
        await store.fetchall("SELECT nope FROM control")
    await store.close()
    with pytest.raises(StoreError):
        await store.execute("SELECT 1")


async def test_limiter_flush_and_load(store):
    lim = Limiter(clock=lambda: 1000.0)
    res = Reservation()
    assert lim.try_reserve(res, [("m", "cust:a", Rate.parse("10/1h"), 3.0)]) is None
    lim.commit(res)
    assert await lim.flush(store) == 1
    other = Limiter(clock=lambda: 1000.0)
    assert await other.load(store) == 1
    assert other.value("cust:a", Rate.parse("10/1h")) == pytest.approx(3.0)


async def test_sanctions_block_is_seen_by_another_node(store, state_url):
    node2 = await open_store(state_url)
    try:
        a, b = Sanctions(store, lambda: None), Sanctions(node2, lambda: None)
        await a.load()
        await b.load()
        await a.block("acme", "test", "ops")
        await b.poll()
        assert "acme" in b.blocked
        await b.unblock("acme", "ops")
        await a.poll()
        assert "acme" not in a.blocked
    finally:
        await node2.close()


async def test_consent_chain_stays_valid_with_two_writers(store, state_url):
    node2 = await open_store(state_url)
    try:
        l1, l2 = Ledger(store), Ledger(node2)

        async def write(ledger: Ledger, who: str) -> None:
            for i in range(20):
                await ledger.append(
                    list_id="l.example",
                    address=f"{who}{i}@x.example",
                    kind=Kind.REQUEST,
                    channel="api",
                )

        await asyncio.gather(write(l1, "a"), write(l2, "b"))
        assert [e.seq for e in await l1.events_of_list("l.example")] == list(range(1, 41))
        assert (await verify_all(l2)).ok
        assert (await l1.head("l.example"))[0] == 40
    finally:
        await node2.close()


async def test_retention_runs_and_pending_deletions(store):
    run = await rstate.start_run(store, "old", 100.0, "test")
    await rstate.add_pending(
        store,
        [
            (run, 100.0, "old", "u@x", "INBOX", "m1", 10),
            (run, 100.0, "old", "u@x", "INBOX", "m2", 20),
        ],
    )
    assert sorted((await rstate.pending(store))["u@x"]) == [
        (run, "INBOX", "m1", 10),
        (run, "INBOX", "m2", 20),
    ]
    await rstate.settle(store, run, "u@x", [("vanished", "INBOX", "m2")], rest="deleted")
    await rstate.finish_run(store, run, 101.0, "done", {"deleted": 1, "vanished": 1})
    assert await rstate.pending(store) == {}
    assert {d["name"]: d["status"] for d in await rstate.deletions(store)} == {
        "m1": "deleted",
        "m2": "vanished",
    }
    assert (await rstate.last_runs(store))["old"]["deleted"] == 1
    assert await rstate.last_completed_start(store, "old") == 100.0
    await rstate.save_log_position(store, "dovecot", inode=5, offset=77, now=1.0)
    assert await rstate.log_position(store, "dovecot") == (5, 77, "")


async def test_lease_is_held_by_one_owner(store):
    assert await leases.acquire(store, "mailbox:u", ttl=60, owner="n1", now=0)
    assert not await leases.acquire(store, "mailbox:u", ttl=60, owner="n2", now=1)
    assert await leases.acquire(store, "mailbox:u", ttl=60, owner="n1", now=2)  # renew
    assert await leases.acquire(store, "mailbox:u", ttl=60, owner="n2", now=100)  # expired
    await leases.release(store, "mailbox:u", owner="n2")
    assert await leases.acquire(store, "mailbox:u", ttl=60, owner="n1", now=101)


async def test_shared_counters_lose_no_increments(store, state_url):
    """Two nodes syncing the same key concurrently: the global value is the sum."""
    if not state_url.startswith("postgresql://"):
        pytest.skip("shared counters are a PostgreSQL feature (one SQLite node owns its file)")
    node2 = await open_store(state_url)
    try:
        rate = Rate.parse("100000/1w")
        nodes = [Limiter(clock=lambda: 1000.0), Limiter(clock=lambda: 1000.0)]
        for lim, s in zip(nodes, (store, node2), strict=True):
            lim.share(s)

        async def send(lim: Limiter, s) -> None:
            for _ in range(30):
                res = Reservation()
                assert await lim.try_reserve_async(res, [("m", "cust:a", rate, 1.0)]) is None
                lim.commit(res)
                await lim.sync(s, ["cust:a#1w"])

        await asyncio.gather(*(send(lim, s) for lim, s in zip(nodes, (store, node2), strict=True)))
        row = await store.fetchone("SELECT value FROM ratelimit_counters WHERE key = 'cust:a#1w'")
        assert row is not None and row[0] == pytest.approx(60.0)

    finally:
        await node2.close()


async def test_a_counter_stored_before_per_window_counting_is_carried_over_once(store, state_url):
    """Two nodes load the old row (3 messages charged once per window: 6); the shares
    reach the shared counters once, and the old row goes."""
    if not state_url.startswith("postgresql://"):
        pytest.skip("shared counters are a PostgreSQL feature")
    node2 = await open_store(state_url)
    try:
        await store.execute(
            "INSERT INTO ratelimit_counters(key, value, ts, period) VALUES (?, ?, ?, ?)",
            ("cust:a", 6.0, 1000.0, 86400.0),
        )
        hour, day = Rate.parse("100/1h"), Rate.parse("1000/1d")
        checks = [("messages", "cust:a", hour, 1.0), ("messages", "cust:a", day, 1.0)]
        nodes = [Limiter(clock=lambda: 1000.0), Limiter(clock=lambda: 1000.0)]
        for lim, s in zip(nodes, (store, node2), strict=True):
            assert await lim.load(s) == 1
            lim.share(s)
        for lim, s in zip(nodes, (store, node2), strict=True):
            res = Reservation()
            assert await lim.try_reserve_async(res, checks) is None
            lim.commit(res)
            await lim.flush(s)
        rows = await store.fetchall("SELECT key, value FROM ratelimit_counters ORDER BY key")
        assert rows == [("cust:a#1d", pytest.approx(5.0)), ("cust:a#1h", pytest.approx(5.0))]
    finally:
        await node2.close()


async def test_shared_limit_holds_across_nodes_within_the_bound(store, state_url):
    if not state_url.startswith("postgresql://"):
        pytest.skip("shared counters are a PostgreSQL feature")
    node2 = await open_store(state_url)
    try:
        rate = Rate.parse("20/1h")
        a, b = Limiter(clock=lambda: 1000.0), Limiter(clock=lambda: 1000.0)
        a.share(store)
        b.share(node2)
        admitted = 0
        for i in range(40):
            lim = (a, b)[i % 2]
            res = Reservation()
            if await lim.try_reserve_async(res, [("m", "cust:a", rate, 1.0)]) is None:
                lim.commit(res)
                admitted += 1
        # unshared, each node would admit 20 (40 in all); the bound is N x max(0.1 x 20, 1)
        assert 20 <= admitted <= 20 + 2 * 2
        assert a.round_trips + b.round_trips < 40 * 2
    finally:
        await node2.close()


# ---------------------------------------------------------------- an unusable state file (SQLite)


async def _refused(path, **kw) -> str:
    with pytest.raises(StoreError) as exc:
        await open_store(str(path), **kw)
    return str(exc.value)


async def test_missing_state_is_created_complete(tmp_path):
    path = tmp_path / "var" / "maild.db"
    s = await open_store(str(path), check=True)
    assert await s.schema_versions() == {c: len(v) for c, v in MIGRATIONS.items()}
    await s.close()
    assert not (tmp_path / "var" / "maild.db.new").exists()


@pytest.mark.parametrize("content", [b"", b"not a database at all\n" * 10])
async def test_empty_or_garbage_state_is_refused_and_left_alone(tmp_path, content):
    """A 0-byte state was silently re-initialised, dropping sanctions and the consent
    ledger (issue 13 #8): now it is refused like a garbage file, naming the way out."""
    path = tmp_path / "maild.db"
    path.write_bytes(content)
    for check in (False, True):  # the CLI's opens and the daemon's start
        msg = await _refused(path, check=check)
        assert str(path) in msg and "--init-state" in msg, msg
        assert ("empty (0 bytes)" if not content else "not a SQLite database") in msg, msg
    assert path.read_bytes() == content


async def test_a_database_that_is_not_maild_state_is_refused(tmp_path):
    path = tmp_path / "maild.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE other(x)")
    con.commit()
    con.close()
    msg = await _refused(path)
    assert "holds no maild state" in msg and "--init-state" in msg, msg


async def test_a_damaged_state_is_refused_at_the_daemons_start(tmp_path):
    path = tmp_path / "maild.db"
    s = await open_store(str(path))
    await s.executemany(
        "INSERT INTO control(ts, kind, arg) VALUES (?, ?, ?)",
        [(float(i), "k", "x" * 500) for i in range(2000)],
    )
    await s.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated copy, as a bad restore leaves
    msg = await _refused(path, check=True)
    assert "is damaged" in msg and "--init-state" in msg, msg


async def test_init_state_moves_the_refused_file_aside_and_starts_empty(tmp_path):
    path = tmp_path / "maild.db"
    path.write_bytes(b"")
    s = await open_store(str(path), check=True, init=True)
    assert await s.fetchone("SELECT COUNT(*) FROM sanctions") == (0,)
    await s.close()
    aside = [p.name for p in tmp_path.iterdir() if ".refused-" in p.name]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == b"", aside
    # a healthy state is left as it is, with or without the flag
    s = await open_store(str(path), check=True, init=True)
    await s.close()
    assert len([p for p in tmp_path.iterdir() if ".refused-" in p.name]) == 1


async def test_health_is_judged_by_writes(store):
    """Reads that work do not make a failing store healthy; a write does (both backends)."""
    assert store.health.ok
    with pytest.raises(StoreError):
        await store.execute("INSERT INTO no_such_table VALUES (1)")
    assert not store.health.ok
    assert await store.fetchone("SELECT COUNT(*) FROM control") == (0,)
    assert not store.health.ok
    from maild.store.core import heartbeat

    await heartbeat(store)
    assert store.health.ok


async def test_requests_are_counted_per_mailbox_under_all_its_tags(store):
    ledger = Ledger(store)
    """bob+1@, bob+2@ reach bob's mailbox: max_requests must count them together, or a
    bomber sends max_requests confirmations per tag. Byte order on both backends."""
    for address in ("bob@x.example", "bob+1@x.example", "Bob+news@X.example"):
        await ledger.append(list_id="l.example", address=address, kind=Kind.REQUEST, channel="web")
    for other in ("bobby@x.example", "bob+1@y.example", "bo@x.example", "bob,x@x.example"):
        await ledger.append(list_id="l.example", address=other, kind=Kind.REQUEST, channel="web")
    await ledger.append(
        list_id="m.example", address="bob+2@x.example", kind=Kind.REQUEST, channel="web"
    )
    for asked in ("bob@x.example", "bob+9@x.example", "BOB+1@x.example"):
        assert await ledger.count_requests("l.example", asked, 0) == 3, asked
    assert await ledger.count_requests("l.example", "bobby@x.example", 0) == 1
