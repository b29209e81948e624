"""Decaying counters with an injected clock: decay, window edges, reservations, restart."""

import pytest

from maild.antispam.limiter import Limiter, Rate, Reservation, seconds_until_free
from maild.components import open_store


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def charge(lim: Limiter, key: str, rate: Rate, n: float = 1) -> bool:
    res = Reservation()
    if lim.try_reserve(res, [("messages", key, rate, n)]) is not None:
        return False
    lim.commit(res)
    return True


def test_rate_parsing():
    assert Rate.parse("200/1h") == Rate(200, 3600, "200/1h")
    assert Rate.parse("2000/d").period == 86400
    assert Rate.parse("500MB/1h").limit == 500 * 1024 * 1024
    for bad in ["200", "x/1h", "10/0h", "10/1y"]:
        with pytest.raises(ValueError):
            Rate.parse(bad)


def test_the_n_plus_first_is_refused_and_decay_frees_it():
    clock = Clock()
    lim = Limiter(clock)
    rate = Rate.parse("10/1h")
    assert all(charge(lim, "cust:a", rate) for _ in range(10))
    assert not charge(lim, "cust:a", rate)
    # linear decay: after 6 minutes one tenth of 10 has decayed: room for exactly one
    clock.t += 360
    assert charge(lim, "cust:a", rate)
    assert not charge(lim, "cust:a", rate)


def test_window_edge_full_reset_after_period():
    clock = Clock()
    lim = Limiter(clock)
    rate = Rate.parse("5/1h")
    for _ in range(5):
        charge(lim, "k", rate)
    clock.t += 3599
    assert lim.value("k") == pytest.approx(5 / 3600)
    clock.t += 1
    assert lim.value("k") == 0.0
    assert all(charge(lim, "k", rate) for _ in range(5))


def test_retry_after_says_when_it_frees_up():
    clock = Clock()
    lim = Limiter(clock)
    rate = Rate.parse("10/1h")
    for _ in range(10):
        charge(lim, "k", rate)
    wait = lim.check("k", rate, 1)
    assert wait == 360  # one tenth of the hour
    assert seconds_until_free(0, 0, 11, rate) == 3600  # never fits: a whole period


def test_reservations_count_until_released_and_only_commit_charges():
    lim = Limiter(Clock())
    rate = Rate.parse("2/1h")
    a, b, c = Reservation(), Reservation(), Reservation()
    assert lim.try_reserve(a, [("m", "k", rate, 1)]) is None
    assert lim.try_reserve(b, [("m", "k", rate, 1)]) is None
    assert lim.try_reserve(c, [("m", "k", rate, 1)]) is not None  # two pending fill it
    lim.release(a)
    lim.release(a)  # idempotent
    assert lim.try_reserve(c, [("m", "k", rate, 1)]) is None
    lim.commit(b)
    lim.release(c)
    assert lim.value("k") == 1.0
    assert lim.counters["k"].pending == 0


def test_all_or_nothing_reservation():
    lim = Limiter(Clock())
    ok, full = Rate.parse("10/1h"), Rate.parse("0/1h")
    res = Reservation()
    over = lim.try_reserve(res, [("messages", "a", ok, 1), ("bytes", "b", full, 1)])
    assert over is not None and over.name == "bytes" and res.items == []
    assert "a" not in lim.counters or lim.counters["a"].pending == 0


def test_reset_by_prefix_and_expiry():
    clock = Clock()
    lim = Limiter(clock)
    rate = Rate.parse("9/1h")
    for key in ["cust:a", "cust:a|rcpts", "cust:ab", "rcpt:a|x@y"]:
        charge(lim, key, rate)
    assert lim.reset("cust:a") == 2
    assert set(lim.counters) == {"cust:ab", "rcpt:a|x@y"}
    clock.t += 3600
    assert lim.expire() == 2 and lim.counters == {}


async def test_counters_survive_a_restart(tmp_path):
    clock = Clock()
    store = await open_store(str(tmp_path / "s.db"))
    lim = Limiter(clock)
    rate = Rate.parse("3/1h")
    for _ in range(3):
        charge(lim, "cust:a", rate)
    assert await lim.flush(store) == 1
    assert await lim.flush(store) == 0  # nothing dirty: no write
    await store.close()

    store = await open_store(str(tmp_path / "s.db"))
    clock.t += 60
    again = Limiter(clock)
    assert await again.load(store) == 1
    assert not charge(again, "cust:a", rate)
    # expired counters are not loaded
    clock.t += 3600
    assert await Limiter(clock).load(store) == 0
    await store.close()


def test_a_counter_without_a_period_never_divides_by_zero():
    """A key stored with period 0, seen by a node whose clock is behind (elapsed < 0)."""
    from maild.antispam.limiter import Counter

    assert Counter(value=5, ts=100).current(now=99, period=0) == 0.0
