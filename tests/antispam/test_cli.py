"""`maild customers`: the listing says what its message figures are."""

from __future__ import annotations

import asyncio
import json
import time

from click.testing import CliRunner

from maild.antispam.limiter import Limiter, Rate, Reservation
from maild.cli import main
from maild.components import open_store


def test_customers_shows_whole_messages_against_each_window(tmp_path):
    db = tmp_path / "state.db"
    policy = tmp_path / "p.toml"
    policy.write_text(
        f'[server]\nstate = "{db}"\n[postmaster]\ndomains = ["h.example"]\n'
        '[[customers]]\nname = "acme"\n[customers.ratelimit]\nmessages = ["100/1h"]\n'
        '[[customers]]\nname = "quiet"\n'
    )

    async def relay_six_messages_ten_minutes_ago() -> None:
        store = await open_store(str(db))
        limiter = Limiter(clock=lambda: time.time() - 600)
        for _ in range(6):
            res = Reservation()
            assert (
                limiter.try_reserve(res, [("messages", "cust:acme", Rate.parse("100/1h"), 1.0)])
                is None
            )
            limiter.commit(res)
        await limiter.flush(store)
        await store.close()

    asyncio.run(relay_six_messages_ten_minutes_ago())
    r = CliRunner().invoke(main, ["customers", "-c", str(policy)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    # 6 messages, decayed for a sixth of the window: 5 (the stored counter is 5.0 or 4.99..)
    assert lines[1].split()[0] == "acme" and lines[1].endswith(" 5 of 100/1h"), r.output
    assert lines[0].split()[-3:] == ["MESSAGES", "(of", "LIMIT/WINDOW)"]
    assert lines[2].split()[0] == "quiet" and lines[2].endswith(" 0 of 200/1h, 0 of 2000/1d"), (
        r.output
    )
    assert "decaying" in lines[-1]
    rows = {
        x["name"]: x
        for x in json.loads(
            CliRunner().invoke(main, ["customers", "-c", str(policy), "--json"]).output
        )
    }
    assert rows["acme"]["messages"] == [{"rate": "100/1h", "count": 5, "limit": 100}]


def _policy(tmp_path) -> tuple[object, object]:
    db, policy = tmp_path / "state.db", tmp_path / "p.toml"
    policy.write_text(
        f'[server]\nstate = "{db}"\n[postmaster]\ndomains = ["h.example"]\n'
        '[[customers]]\nname = "acme"\n[[customers]]\nname = "acmex"\n'
    )
    return db, policy


def _relay(db, customer: str, n: int, ago: float = 0.0) -> None:
    """n messages of one recipient and 1000 bytes each, counted as the rule counts them."""
    from maild.policy.ratelimit import RateLimits, customer_key

    lim = RateLimits()  # the shipped defaults, which the policy above keeps

    async def run() -> None:
        store = await open_store(str(db))
        limiter = Limiter(clock=lambda: time.time() - ago)
        for _ in range(n):
            res = Reservation()
            checks = (
                [("messages", customer_key("messages", customer), r, 1.0) for r in lim.messages]
                + [
                    ("recipients", customer_key("recipients", customer), r, 1.0)
                    for r in lim.recipients
                ]
                + [("bytes", customer_key("bytes", customer), r, 1000.0) for r in lim.bytes]
                + [
                    ("same_recipient", f"rcpt:{customer}|x@outside.example", r, 1.0)
                    for r in lim.same_recipient
                ]
            )
            assert limiter.try_reserve(res, checks) is None
            limiter.commit(res)
        await limiter.flush(store)
        await store.close()

    asyncio.run(run())


def _keys(db) -> list[str]:
    import sqlite3

    with sqlite3.connect(db) as c:
        return sorted(r[0] for r in c.execute("SELECT key FROM ratelimit_counters"))


def test_customer_show_gives_whole_counts_against_each_window(tmp_path):
    db, policy = _policy(tmp_path)
    _relay(db, "acme", 7, ago=360)  # a tenth of an hour ago: 6.3 of the hour, 6.97 of the day
    r = CliRunner().invoke(main, ["customer", "show", "acme", "-c", str(policy)])
    assert r.exit_code == 0, r.output
    assert "  messages: 6 of 200/1h, 7 of 2000/1d\n" in r.output
    assert "  recipients: 6 of 500/1h, 7 of 5000/1d\n" in r.output
    assert "  bytes: 6300 of 500MB/1h\n" in r.output
    st = json.loads(
        CliRunner().invoke(main, ["customer", "show", "acme", "-c", str(policy), "--json"]).output
    )
    assert st["messages"] == [
        {"rate": "200/1h", "count": 6, "limit": 200},
        {"rate": "2000/1d", "count": 7, "limit": 2000},
    ]


def test_reset_of_a_customer_clears_all_its_windows(tmp_path):
    db, policy = _policy(tmp_path)
    _relay(db, "acme", 2)
    _relay(db, "acmex", 1)
    r = CliRunner().invoke(main, ["ratelimit", "reset", "cust:acme#1d", "-c", str(policy)])
    assert r.exit_code == 0 and "1 stored counter(s) removed" in r.output, r.output
    assert "cust:acme#1d" not in _keys(db) and "cust:acme#1h" in _keys(db)
    r = CliRunner().invoke(main, ["ratelimit", "reset", "acme", "-c", str(policy)])
    assert r.exit_code == 0 and "5 stored counter(s) removed" in r.output, r.output
    assert [k for k in _keys(db) if "acme|" in k or "acme#" in k] == []
    assert (
        len([k for k in _keys(db) if "acmex" in k]) == 6
    )  # messages and recipients in 2 windows, bytes, same_recipient


def test_a_counter_stored_before_per_window_counting_shows_by_its_share(tmp_path):
    db, policy = _policy(tmp_path)

    async def old_row() -> None:  # 3 messages, charged once per window: stored as 6
        store = await open_store(str(db))
        await store.execute(
            "INSERT INTO ratelimit_counters(key, value, ts, period) VALUES (?, ?, ?, ?)",
            ("cust:acme", 6.0, time.time(), 86400.0),
        )
        await store.close()

    asyncio.run(old_row())
    r = CliRunner().invoke(main, ["customers", "-c", str(policy)])
    assert " 3 of 200/1h, 3 of 2000/1d" in r.output.splitlines()[1], r.output
    r = CliRunner().invoke(main, ["ratelimit", "reset", "acme", "-c", str(policy)])
    assert "1 stored counter(s) removed" in r.output and _keys(db) == []
