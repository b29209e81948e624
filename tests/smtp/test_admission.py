"""Admission control as pure logic: slots, reserved share, shedding, rate, stress."""

from __future__ import annotations

import logging
import tracemalloc

import pytest

import maild.smtp.admission as admission_module
from maild.config import parse
from maild.smtp.admission import SHED_MIN_IDLE, Admission, LogOnce, Refusal, Slot


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(**kw: object):
    return parse({"postmaster": {"domains": ["h.example"]}, "server": {"limits": kw}}).server.limits


@pytest.fixture
def clock() -> Clock:
    return Clock()


def admit(
    adm: Admission, addr: str, events: list, *, reserved: bool = False, exempt: bool = False
) -> Slot | Refusal:
    return adm.admit(
        addr, reserved=reserved, exempt=exempt, notify=lambda e, a=addr: events.append((a, e))
    )


def test_per_client_count_and_trusted_exempt(clock):
    adm = Admission(limits(max_sessions_per_ip=2), clock=clock)
    ev: list = []
    assert isinstance(admit(adm, "192.0.2.1", ev), Slot)
    assert isinstance(admit(adm, "192.0.2.1", ev), Slot)
    r = admit(adm, "192.0.2.1", ev)
    assert isinstance(r, Refusal) and r.reply.startswith("421 4.7.0 Too many connections from")
    assert r.rule == "sessions"
    for _ in range(5):
        assert isinstance(admit(adm, "127.0.0.1", ev, reserved=True, exempt=True), Slot)


def test_connection_rate_counts_attempts_in_a_minute(clock):
    adm = Admission(limits(max_connection_rate_per_ip=3), clock=clock)
    ev: list = []
    for _ in range(3):
        s = admit(adm, "192.0.2.1", ev)
        assert isinstance(s, Slot)
        adm.release(s)
        clock.now += 1
    r = admit(adm, "192.0.2.1", ev)
    assert isinstance(r, Refusal) and r.rule == "connection-rate" and "limit 3" in r.reply
    assert isinstance(admit(adm, "192.0.2.2", ev), Slot)  # per client
    clock.now += 58.5  # the first attempt's minute is over; the refused one counted
    assert isinstance(admit(adm, "192.0.2.1", ev), Slot)


def test_connection_rate_memory_does_not_grow_with_attempts(clock):
    """The rate costs a count per client, not a record per attempt: a crowd reconnecting
    at once must not leave tens of thousands of objects scattered over the heap, which
    keep CPython's allocator from giving its arenas back after the load."""
    adm = Admission(limits(max_connection_rate_per_ip=600), clock=clock)
    ev: list = []
    crowd = [f"192.0.2.{i}" for i in range(1, 51)]

    def attempts(n: int) -> None:
        for _ in range(n):
            for addr in crowd:
                s = admit(adm, addr, ev)
                if isinstance(s, Slot):
                    adm.release(s)
            clock.now += 0.01

    attempts(10)  # every client known
    # Only what admission's own code allocated: other tests' threads in this process
    # (an xdist worker) allocate too while the crowd is counted.
    only = [tracemalloc.Filter(True, admission_module.__file__)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces(only)
        attempts(500)  # 25,000 more attempts within the minute
        after = tracemalloc.take_snapshot().filter_traces(only)
        grown = sum(d.size_diff for d in after.compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024, f"{grown} bytes kept for 25,000 attempts from 50 clients"


def test_customer_networks_are_not_held_to_the_connection_rate(clock):
    """A customer's MTA opening one connection per message (10 a second is ordinary)
    must not hear 421: Postfix exempts $mynetworks from anvil's rate, and the customer's
    pace is what [ratelimit] limits."""
    adm = Admission(limits(max_connection_rate_per_ip=3), clock=clock)
    ev: list = []
    for _ in range(10):
        s = admit(adm, "192.0.2.9", ev, reserved=True)
        assert isinstance(s, Slot)
        adm.release(s)


def test_refusals_are_logged_once_per_client_per_minute(clock):
    adm = Admission(limits(max_sessions_per_ip=1), clock=clock)
    ev: list = []
    admit(adm, "192.0.2.1", ev)
    said = [admit(adm, "192.0.2.1", ev) for _ in range(5)]
    assert [r.log for r in said] == [True, False, False, False, False]
    assert isinstance(admit(adm, "192.0.2.9", ev), Slot)
    clock.now += 60
    r = admit(adm, "192.0.2.1", ev)
    assert r.log and r.unsaid == 4


def test_reserved_share_keeps_customers_in_when_strangers_fill_theirs(clock):
    adm = Admission(
        limits(max_sessions=10, reserved_sessions=3, max_sessions_per_ip=100), clock=clock
    )
    ev: list = []
    strangers = [admit(adm, f"198.51.100.{i}", ev) for i in range(7)]
    assert all(isinstance(s, Slot) for s in strangers)
    # the strangers' share (7) is full and nobody has been idle for a second: refused
    r = admit(adm, "198.51.100.99", ev)
    assert isinstance(r, Refusal) and "clients outside our customers' networks" in r.reply
    for i in range(3):
        assert isinstance(admit(adm, f"192.0.2.{i}", ev, reserved=True), Slot)
    assert adm.total == 10 and [e for e in ev if e[1] == "shed"] == []


def test_a_newcomer_sheds_the_longest_idle_session_of_the_biggest_holder(clock):
    adm = Admission(limits(max_sessions=7, reserved_sessions=1), clock=clock)
    ev: list = []
    hog = [admit(adm, "198.51.100.1", ev) for _ in range(4)]
    other = [admit(adm, "198.51.100.2", ev) for _ in range(2)]
    clock.now += 10
    adm.busy(hog[0])  # working on a command: not sheddable
    adm.busy(hog[3])
    adm.idle(hog[1], in_transaction=True)  # between two commands of a transaction
    adm.idle(hog[2])  # idle since now, but with no transaction to lose
    clock.now += SHED_MIN_IDLE / 2
    new = admit(adm, "203.0.113.5", ev)  # a stranger writing to postmaster, say
    assert isinstance(new, Slot)
    assert [e for e in ev if e[1] == "shed"] == [("198.51.100.1", "shed")]
    assert hog[2].released and not any(s.released for s in other)
    assert adm.total == 6


def test_a_reconnecting_crowd_cannot_churn_the_slots(clock):
    adm = Admission(limits(max_sessions=5, reserved_sessions=1), clock=clock)
    ev: list = []
    crowd = [admit(adm, "198.51.100.1", ev) for _ in range(2)]
    crowd += [admit(adm, "198.51.100.2", ev) for _ in range(2)]
    clock.now += 60
    # one of the crowd comes back from an address that holds its share: refused
    assert isinstance(admit(adm, "198.51.100.1", ev), Refusal)
    # a newcomer from an address of its own gets in, at the crowd's expense
    assert isinstance(admit(adm, "198.51.100.3", ev), Slot)
    assert [e for e in ev if e[1] == "shed"] == [("198.51.100.1", "shed")]
    # and the one closed, coming back (its address now holds 1, the other 2): refused
    assert isinstance(admit(adm, "198.51.100.1", ev), Refusal)
    assert len([e for e in ev if e[1] == "shed"]) == 1


def test_a_customer_sheds_the_longest_idle_stranger(clock):
    adm = Admission(limits(max_sessions=3, reserved_sessions=1), clock=clock)
    ev: list = []
    a = admit(adm, "198.51.100.1", ev)
    clock.now += 5
    admit(adm, "198.51.100.2", ev)
    admit(adm, "192.0.2.1", ev, reserved=True)
    clock.now += SHED_MIN_IDLE
    assert isinstance(admit(adm, "192.0.2.2", ev, reserved=True), Slot)
    assert a.released and [e for e in ev if e[1] == "shed"] == [("198.51.100.1", "shed")]


def test_no_stranger_idle_long_enough_means_refusal(clock):
    adm = Admission(limits(max_sessions=3, reserved_sessions=1), clock=clock)
    ev: list = []
    a, b = admit(adm, "198.51.100.1", ev), admit(adm, "198.51.100.2", ev)
    admit(adm, "192.0.2.1", ev, reserved=True)
    adm.idle(a, in_transaction=True)  # both between two commands of a transaction
    adm.idle(b, in_transaction=True)
    clock.now += SHED_MIN_IDLE / 2
    assert isinstance(admit(adm, "192.0.2.2", ev, reserved=True), Refusal)
    adm.busy(a)
    adm.busy(b)
    clock.now += 100
    assert isinstance(admit(adm, "192.0.2.2", ev, reserved=True), Refusal)
    assert [e for e in ev if e[1] == "shed"] == []


def test_stress_shrinks_strangers_timeouts_and_logs_start_and_end(clock, caplog):
    adm = Admission(
        limits(max_sessions=8, reserved_sessions=4, command_timeout="5m", data_timeout="10m"),
        clock=clock,
    )
    ev: list = []
    caplog.set_level(logging.INFO, "maild.smtp")
    cust = admit(adm, "192.0.2.1", ev, reserved=True)
    slots = [admit(adm, f"198.51.100.{i}", ev) for i in range(3)]
    assert not adm.stressed and adm.command_timeout(slots[0]) == 300
    slots.append(admit(adm, "198.51.100.3", ev))  # the strangers' share (4) is full
    assert adm.stressed
    assert adm.command_timeout(slots[0]) == 10 and adm.data_timeout(slots[0]) == 120
    assert adm.command_timeout(cust) == 300  # customers keep theirs
    assert sorted(e for e in ev) == [(f"198.51.100.{i}", "stress") for i in range(4)]
    starts = [r.message for r in caplog.records if "stress: started" in r.message]
    assert len(starts) == 1 and "sessions=5/8" in starts[0]
    adm.release(slots.pop())
    assert adm.stressed  # 3 strangers is not below 3/4 of the share: no flapping
    adm.release(slots.pop())
    assert not adm.stressed
    ends = [r.message for r in caplog.records if "stress: ended" in r.message]
    assert len(ends) == 1 and "sessions=3/8" in ends[0]


def test_log_once_forgets_old_keys_when_full(clock):
    once = LogOnce(clock=clock, max_keys=2)
    assert once.say("a")[0] and once.say("b")[0]
    clock.now += 61
    assert once.say("c")[0] and once.say("a")[0]


def test_log_once_forgets_a_key_a_window_after_its_window(clock):
    """Refusals of a crowd from many addresses are logged once per address per minute;
    the addresses must not stay in the table for good (until 100,000 of them)."""
    once = LogOnce(clock=clock)
    for i in range(50):
        assert once.say(f"198.51.100.{i}")[0]
        assert not once.say(f"198.51.100.{i}")[0]  # within the minute: unsaid
    clock.now += 61
    assert once.say("198.51.100.0") == (True, 1)  # at it in the next minute: "1 more"
    clock.now += 61
    assert once.say("192.0.2.1") == (True, 0)
    assert set(once._last) == {"198.51.100.0", "192.0.2.1"} and not once._unsaid
    assert once.say("198.51.100.7") == (True, 0)  # back much later: a new count


def test_limits_are_checked_by_check_config():
    from maild.config import ConfigError

    with pytest.raises(ConfigError) as e:
        limits(
            max_sessions=10,
            reserved_sessions=10,
            downstream_connections=5,
            downstream_reserved=5,
            memory_in_flight="1MB",
            spool_threshold="2MB",
        )
    text = str(e.value)
    assert "reserved_sessions = 10: expected fewer than max_sessions (10)" in text
    assert "downstream_reserved = 5: expected fewer than downstream_connections (5)" in text
    assert "spool_threshold = 2097152: expected at most memory_in_flight" in text
    assert limits(max_sessions=50).reserved_sessions == 10
