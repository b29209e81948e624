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
    assert lim.value("k", rate) == pytest.approx(5 / 3600)
    clock.t += 1
    assert lim.value("k", rate) == 0.0
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
    assert lim.value("k", rate) == 1.0
    assert lim.counters["k#1h"].pending == 0


def test_all_or_nothing_reservation():
    lim = Limiter(Clock())
    ok, full = Rate.parse("10/1h"), Rate.parse("0/1h")
    res = Reservation()
    over = lim.try_reserve(res, [("messages", "a", ok, 1), ("bytes", "b", full, 1)])
    assert over is not None and over.name == "bytes" and res.items == []
    assert "a#1h" not in lim.counters or lim.counters["a#1h"].pending == 0


def test_reset_by_prefix_and_expiry():
    clock = Clock()
    lim = Limiter(clock)
    rate = Rate.parse("9/1h")
    for key in ["cust:a", "cust:a|rcpts", "cust:ab", "rcpt:a|x@y"]:
        charge(lim, key, rate)
    assert lim.reset("cust:a") == 2
    assert set(lim.counters) == {"cust:ab#1h", "rcpt:a|x@y#1h"}
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


def test_each_window_counts_a_message_once_and_decays_over_its_own_period():
    """["3/1h", "5/1d"]: 3 in the hour; an hour later the day still remembers them."""
    clock = Clock()
    lim = Limiter(clock)
    hour, day = Rate.parse("3/1h"), Rate.parse("5/1d")

    def send() -> str | None:
        res = Reservation()
        over = lim.try_reserve(
            res, [("messages", "cust:a", hour, 1.0), ("messages", "cust:a", day, 1.0)]
        )
        if over is None:
            lim.commit(res)
        return None if over is None else over.rate.text

    assert [send() for _ in range(4)] == [None, None, None, "3/1h"]
    assert lim.value("cust:a", hour) == 3.0 and lim.value("cust:a", day) == 3.0
    clock.t += 3600  # the hour is free again; the day holds 3 x 23/24 = 2.875
    assert [send() for _ in range(3)] == [None, None, "5/1d"]


def test_two_rates_of_one_period_are_one_counter_charged_once():
    lim = Limiter(Clock())
    a, b = Rate.parse("3/1h"), Rate.parse("5/60m")
    res = Reservation()
    assert lim.try_reserve(res, [("messages", "k", a, 1.0), ("messages", "k", b, 1.0)]) is None
    lim.commit(res)
    assert set(lim.counters) == {"k#1h"} and lim.value("k", a) == 1.0


def test_reset_clears_every_window_of_a_key_or_one_window():
    lim = Limiter(Clock())
    hour, day = Rate.parse("9/1h"), Rate.parse("9/1d")
    for key in ["cust:a", "cust:a|rcpts", "cust:ab"]:
        for rate in (hour, day):
            charge(lim, key, rate)
    assert lim.reset("cust:a#1d") == 1
    assert lim.reset("cust:a") == 3
    assert set(lim.counters) == {"cust:ab#1h", "cust:ab#1d"}


async def test_a_counter_stored_before_per_window_counting_is_carried_over(tmp_path, caplog):
    """The old maild kept one counter for both windows and charged it once per window:
    3 messages were stored as 6. After the upgrade each window holds 3, the old row goes."""
    clock = Clock()
    store = await open_store(str(tmp_path / "s.db"))
    await store.execute(
        "INSERT INTO ratelimit_counters(key, value, ts, period) VALUES (?, ?, ?, ?)",
        ("cust:a", 6.0, clock.t, 86400.0),
    )
    lim = Limiter(clock)
    assert await lim.load(store) == 1
    assert "ratelimit: legacy counters=1" in caplog.text
    hour, day = Rate.parse("4/1h"), Rate.parse("10/1d")
    checks = [("messages", "cust:a", hour, 1.0), ("messages", "cust:a", day, 1.0)]
    res = Reservation()
    assert lim.try_reserve(res, checks) is None  # 3 + 1 fit under 4/1h
    lim.commit(res)
    assert lim.value("cust:a", hour) == 4.0 and lim.value("cust:a", day) == 4.0
    over = lim.try_reserve(Reservation(), checks)
    assert over is not None and over.key == "cust:a#1h"
    await lim.flush(store)
    rows = await store.fetchall("SELECT key, value FROM ratelimit_counters ORDER BY key")
    assert rows == [("cust:a#1d", 4.0), ("cust:a#1h", 4.0)]
    await store.close()


def test_an_unused_old_counter_expires_with_its_period():
    lim = Limiter(clock := Clock())
    lim.legacy["cust:a"] = (6.0, clock.t, 3600.0)
    clock.t += 3600
    assert lim.expire() == 1 and lim.legacy == {} and "cust:a" in lim.dirty
