"""The supervisor <-> worker channel and the shared state behind it, over real socketpairs.

Two "workers" in one event loop talk to one StateHost-backed supervisor end each: the
rate limiter they share admits exactly the limit, a dead worker's reservations are
released, and a call whose peer is gone is a StoreError (the proxy's 451), never a hang.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from maild.antispam.campaigns import Campaigns
from maild.antispam.limiter import Limiter, Rate, Reservation
from maild.config import Limits
from maild.store.base import StoreError
from maild.workers.ipc import Channel, ChannelClosed, RemoteError
from maild.workers.shared import RemoteCampaigns, RemoteLimiter, StateHost
from maild.workers.shares import limits_share, share
from maild.workers.supervisor import describe, merge


async def pair(handler_a, handler_b) -> tuple[Channel, Channel]:
    s1, s2 = socket.socketpair()
    a, b = Channel(s1, handler_a, name="a"), Channel(s2, handler_b, name="b")
    await a.start()
    await b.start()
    return a, b


def nothing(kind: str, args: tuple) -> None:
    raise ValueError(kind)


async def test_calls_are_answered_in_order_and_notices_need_no_answer():
    seen = []

    async def slow(x: int) -> int:
        await asyncio.sleep(0.01)
        return x * 2

    def handler(kind: str, args: tuple):
        seen.append((kind, args))
        if kind == "double":
            return slow(*args)
        if kind == "boom":
            raise KeyError("no such thing")
        return args[0] + 1

    worker, sup = await pair(nothing, handler)
    try:
        worker.send("note", 1)
        assert await worker.call("inc", 41) == 42
        assert await asyncio.gather(*(worker.call("double", i) for i in range(5))) == [
            0,
            2,
            4,
            6,
            8,
        ]
        with pytest.raises(RemoteError, match="KeyError"):
            await worker.call("boom")
        assert seen[0] == ("note", (1,))  # the notice came first, as it was sent
    finally:
        await worker.close()
        await sup.close()


async def test_a_closed_peer_fails_waiting_calls_and_runs_on_close():
    hold = asyncio.Event()

    async def never(*_a):
        await hold.wait()

    worker, sup = await pair(nothing, lambda kind, args: never())
    closed = []
    worker.on_close.append(lambda: closed.append(True))
    waiting = asyncio.ensure_future(worker.call("wait"))
    await asyncio.sleep(0.01)
    await sup.close()
    with pytest.raises(ChannelClosed):
        await waiting
    assert closed == [True]
    with pytest.raises(ChannelClosed):
        worker.send("late")
    hold.set()


async def test_two_workers_share_one_limiter_exactly_and_a_dead_ones_reservations_go():
    limiter = Limiter()
    rate = Rate.parse("10/1h")
    hosts, workers, sups = [], [], []
    for _ in range(2):
        host = StateHost(limiter, Campaigns(), None, None, None, list)  # type: ignore[arg-type]
        w, s = await pair(nothing, host.handle)
        s.on_close.append(host.release_all)
        hosts.append(host)
        workers.append(RemoteLimiter(w))
        sups.append(s)
    checks = [("messages", "cust:acme", rate, 1.0)]

    async def one(i: int) -> tuple[int, Reservation | None]:
        res = Reservation()
        over = await workers[i % 2].try_reserve_async(res, checks)
        if over is not None:
            workers[i % 2].release(res)  # as the finish hook does
        return i % 2, None if over else res

    # 30 transactions at once over both workers: exactly 10 get a reservation
    got = await asyncio.gather(*(one(i) for i in range(30)))
    held = [(w, r) for w, r in got if r is not None]
    assert len(held) == 10
    # worker 0 commits its own; worker 1 dies before committing: its reservations go
    for w, res in held:
        if w == 0:
            workers[0].commit(res)
    committed = sum(1 for w, _ in held if w == 0)
    await asyncio.sleep(0.05)
    await workers[1].channel.close()
    await asyncio.sleep(0.05)
    assert hosts[0].held == {} and hosts[1].held == {}
    assert limiter.value("cust:acme", rate) == pytest.approx(committed, abs=0.01)
    assert limiter.counters["cust:acme#1h"].pending == 0
    # a worker whose supervisor is gone gets the store's kind of failure: a tempfail
    with pytest.raises(StoreError, match="shared state"):
        await workers[1].try_reserve_async(Reservation(), checks)
    await workers[0].channel.close()


async def test_campaign_scores_are_the_supervisors():
    campaigns = Campaigns()
    host = StateHost(Limiter(), campaigns, None, None, None, list)  # type: ignore[arg-type]
    w, s = await pair(nothing, host.handle)
    remote = RemoteCampaigns(w)
    sig = tuple(range(32))
    for _ in range(3):
        remote.add("acme", sig, 4)
    copies, score = await remote.score_async("acme", sig, 4)
    assert copies == 3 and score == pytest.approx(8.0)  # 3 x sqrt(4) + this one
    await w.close()
    await s.close()


def test_shares_add_up_to_the_hosts_limits_and_never_exceed_them():
    lim = Limits(max_sessions=501, reserved_sessions=100, memory_in_flight=1000)
    parts = [limits_share(lim, i, 3) for i in range(3)]
    assert [p.max_sessions for p in parts] == [167, 167, 167]
    assert sum(p.reserved_sessions for p in parts) == 100
    assert sum(p.memory_in_flight for p in parts) == 1000
    assert all(p.spool_threshold <= p.memory_in_flight for p in parts)
    assert all(p.reserved_sessions < p.max_sessions for p in parts)
    assert limits_share(lim, 0, 1) is lim
    assert share(0, 1, 2) == 0 and share(1, 1, 2, floor=1) == 1


def test_status_of_the_workers_merges_and_exits_are_described():
    a = {"admission": {"sessions": 2, "stress": False}, "downstream": {"busiest_client": 3}}
    b = {"admission": {"sessions": 5, "stress": True}, "downstream": {"busiest_client": 1}}
    assert merge([a, b]) == {
        "admission": {"sessions": 7, "stress": True},
        "downstream": {"busiest_client": 3},
    }
    assert describe(9) == "killed by signal 9 (SIGKILL)"
    assert describe(1 << 8) == "exit status 1"


async def test_the_calls_of_one_turn_of_the_loop_go_out_in_one_write():
    """Twenty sessions asking in the same turn wake the supervisor once, not twenty times
    (a write and a wake-up per call cost a worker ~0.5 ms per message)."""
    worker, sup = await pair(nothing, lambda kind, args: args[0] + 1)
    writes = []
    real = worker._transport.write
    worker._transport.write = lambda data: (writes.append(len(data)), real(data))[1]
    try:
        answers = await asyncio.gather(*(worker.call("inc", i) for i in range(20)))
        assert answers == [i + 1 for i in range(20)]
        assert len(writes) == 1
    finally:
        await worker.close()
        await sup.close()
