"""The warn-then-block ladder, strike cooldown, unblock, and CLI changes seen by the daemon."""

import asyncio

from maild.antispam.sanctions import Sanctions, SanctionsConfig, set_state
from maild.components import open_store, parse

CONFIG = parse(
    {
        "postmaster": {"domains": ["h.example"]},
        "customers": [{"name": "acme", "contact": "ops@acme.example"}],
        "sanctions": {"window": "7d", "cooldown": "1h"},
    }
)


class Clock:
    t = 1_000_000.0

    def __call__(self):
        return self.t


async def make(tmp_path, notices=None):
    store = await open_store(str(tmp_path / "s.db"))

    async def notifier(customer, action, reason, strikes):
        if notices is not None:
            notices.append((customer, action, strikes))

    clock = Clock()
    s = Sanctions(store, lambda: CONFIG, notifier, clock=clock)
    await s.load()
    return s, store, clock


async def test_first_offence_warns_second_blocks(tmp_path):
    notices = []
    s, store, clock = await make(tmp_path, notices)
    assert await s.strike("acme", "ratelimit", "too many") == "warn"
    assert "acme" not in s.blocked
    clock.t += 7200
    assert await s.strike("acme", "bulk", "campaign") == "block"
    assert "acme" in s.blocked and "2 offences" in s.blocked["acme"].reason
    await s.drain()
    assert notices == [("acme", "warn", 1), ("acme", "block", 2)]
    # further strikes while blocked change nothing
    clock.t += 7200
    assert await s.strike("acme", "bulk", "more") is None
    rows = await store.fetchall(
        "SELECT action FROM sanction_events WHERE customer='acme' ORDER BY id"
    )
    assert [r[0] for r in rows] == ["strike", "warn", "strike", "block", "strike"]
    await store.close()


async def test_strikes_outside_the_window_do_not_count(tmp_path):
    s, store, clock = await make(tmp_path)
    assert await s.strike("acme", "ratelimit", "x") == "warn"
    clock.t += 8 * 86400
    assert await s.strike("acme", "ratelimit", "y") == "warn"
    await store.close()


async def test_cooldown_makes_retries_one_offence(tmp_path):
    s, store, clock = await make(tmp_path)
    for _ in range(5):
        s.strike_soon("acme", "ratelimit", "retry")
    await s.drain()
    n = (await store.fetchone("SELECT COUNT(*) FROM strikes"))[0]
    assert n == 1
    clock.t += 3601
    s.strike_soon("acme", "ratelimit", "again")
    await s.drain()
    assert (await store.fetchone("SELECT COUNT(*) FROM strikes"))[0] == 2
    await store.close()


async def test_unblock_clears_old_strikes(tmp_path):
    s, store, clock = await make(tmp_path)
    await s.strike("acme", "a", "x")
    clock.t += 10
    await s.strike("acme", "b", "y")
    assert "acme" in s.blocked
    await s.unblock("acme", "cli:test")
    assert "acme" not in s.blocked
    clock.t += 10
    assert await s.strike("acme", "c", "z") == "warn"  # counting starts again
    await store.close()


async def test_cli_change_reaches_the_daemon_through_poll(tmp_path):
    s, store, _ = await make(tmp_path)
    seen = []
    s.on_control.append(lambda kind, arg: seen.append((kind, arg)))
    other = await open_store(str(tmp_path / "s.db"))  # as the CLI would
    await set_state(other, "acme", "blocked", "manual", "cli:root")
    await s.poll()
    assert s.blocked["acme"].reason == "manual" and ("sanctions", "acme") in seen
    await set_state(other, "acme", "ok", "lifted", "cli:root", clear=True)
    await s.poll()
    assert "acme" not in s.blocked
    await other.close()
    await store.close()


def test_config_defaults_and_errors():
    assert CONFIG.sections["sanctions"] == SanctionsConfig(window=7 * 86400, cooldown=3600)
    import pytest

    from maild.config import ConfigError

    with pytest.raises(ConfigError, match=r'sanctions.ladder\[0\] = "shout"'):
        parse({"postmaster": {"domains": ["h.example"]}, "sanctions": {"ladder": ["shout"]}})


def test_notice_text_says_what_and_how(tmp_path):
    from maild.antispam.notify import compose

    msg, rcpts = compose(
        CONFIG, "acme", "warn", "1 offence in 7 days, latest: ratelimit: Rate limit messages", 1
    )
    assert rcpts == ["ops@acme.example", "postmaster@h.example"]
    body = msg.get_content()
    assert "warning" in body.lower() and "abuse@h.example" in body and "rate limit" in body.lower()
    assert msg["Auto-Submitted"] == "auto-generated"
    asyncio.get_event_loop_policy()  # keep asyncio import used


async def test_a_control_row_committed_late_is_still_applied(tmp_path):
    """Several nodes: id 5 may become visible after id 6 was read; it must not be lost."""
    s, store, _ = await make(tmp_path)
    seen = []
    s.on_control.append(lambda kind, arg: seen.append((kind, arg)))
    await store.execute(
        "INSERT INTO control(id, ts, kind, arg) VALUES (6, 0, 'ratelimit-reset', 'b')"
    )
    await s.poll()
    await store.execute(
        "INSERT INTO control(id, ts, kind, arg) VALUES (5, 0, 'ratelimit-reset', 'a')"
    )
    await s.poll()
    await s.poll()  # and only once
    assert seen == [("ratelimit-reset", "b"), ("ratelimit-reset", "a")]
    await store.close()


async def test_one_offence_seen_by_two_nodes_is_one_strike(tmp_path):
    a, store, clock = await make(tmp_path)
    b = Sanctions(store, lambda: CONFIG, None, clock=clock)  # a second node, own memory
    await b.load()
    assert await a.strike("acme", "ratelimit", "seen on a") == "warn"
    assert await b.strike("acme", "ratelimit", "seen on b") is None
    assert (await store.fetchone("SELECT COUNT(*) FROM strikes"))[0] == 1
    await store.close()
