"""Outbound anti-spam through maild and a real Postfix: limits, bulk, warn-then-block."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from tests.harness.clients import swaks
from tests.harness.maild import Maild
from tests.harness.waits import wait_until
from tests.integration.conftest import front_policy

LIMITED, SPAMMER, BLOCKME, UPGRADED = "127.0.0.20", "127.0.0.21", "127.0.0.22", "127.0.0.23"


def policy(port: int) -> dict:
    p = front_policy(port)
    p["customers"] += [
        {
            "name": "limited",
            "networks": [f"{LIMITED}/32"],
            "contact": "ops-limited@hosted.example",
            "ratelimit": {"messages": ["3/1h", "10/1d"]},
        },  # each window counts a message once
        {"name": "spammer", "networks": [f"{SPAMMER}/32"], "contact": "ops-spammer@hosted.example"},
        {"name": "blockme", "networks": [f"{BLOCKME}/32"]},
    ]
    p["sanctions"] = {"contact": "abuse@hosted.example"}
    return p


@pytest.fixture(scope="module")
def m(postfix, tmp_path_factory):
    md = Maild(tmp_path_factory.mktemp("antispam"), policy(postfix.reinject_port))
    md.start()
    yield md
    md.stop()


def test_limit_refuses_the_fourth_warns_and_survives_restart(postfix, m):
    for i in range(3):
        r = swaks(m.port, frm="a@limited.example", to=f"r{i}@outside.example", bind=LIMITED)
        assert r.data_code == 250, r.output
    m.stop()  # counters are persisted at stop ...
    m.start()  # ... and loaded at start
    shown = m.cli("customers").stdout
    assert any(
        line.startswith("limited ") and line.endswith(" 3 of 3/1h, 3 of 10/1d")
        for line in shown.splitlines()
    ), shown
    r = swaks(m.port, frm="a@limited.example", to="r9@outside.example", bind=LIMITED)
    assert r.rcpt_codes == [450], r.output
    assert "450 4.7.1 Rate limit messages (3/1h) exceeded; try again in" in r.output
    m.wait_log("rule=ratelimit")
    # the first offence is a warning, delivered to the customer's contact and to postmaster
    notice = postfix.wait_for_messages("ops-limited@hosted.example", 1)[-1]
    assert b"Subject: [maild] Warning: outbound mail from limited" in notice
    assert b"abuse@hosted.example" in notice
    pm = postfix.wait_for_messages("postmaster@hosted.example", 1)
    assert any(b"Warning: outbound mail from limited" in x for x in pm)
    # postmaster is never limited
    assert (
        swaks(
            m.port, frm="a@limited.example", to="postmaster@hosted.example", bind=LIMITED
        ).data_code
        == 250
    )
    # an operator resets the counter: mail flows again
    assert m.cli("ratelimit", "reset", "limited").returncode == 0
    assert wait_until(
        lambda: (
            swaks(m.port, frm="a@limited.example", to="r10@outside.example", bind=LIMITED).data_code
            == 250
        )
    )


def test_personalised_campaign_trips_the_bulk_rule(postfix, m):
    codes = []
    for n in range(5):
        name = ["anna", "bert", "cleo", "dirk", "emma"][n]
        body = (
            f"Hello {name.title()}, our autumn offer: 40% off every coat in the store at "
            f"https://shop.example/coats?ref={name}{n} until {n + 10} December.\r\n"
            "Unsubscribe by replying. Best wishes, the shop team\r\n"
        )
        r = swaks(
            m.port,
            frm="news@spammer.example",
            bind=SPAMMER,
            to=[f"c{n}x{i}@outside.example" for i in range(30)],
            header=[
                f"Subject: Autumn offer for {name}",
                f"To: {name.title()} <{name}@outside.example>",
            ],
            body=body,
        )
        codes.append(r.data_code)
        if r.data_code != 250:
            assert "550 5.7.1 Bulk mail refused" in r.output and "Breidbart index 21.9" in r.output
    assert codes == [250, 250, 250, 550, 550], codes
    m.wait_log("rule=bulk")


def test_blocked_customer_reaches_postmaster_and_unblock_restores(postfix, m):
    assert (
        swaks(m.port, frm="a@blockme.example", to="x@outside.example", bind=BLOCKME).data_code
        == 250
    )
    r = m.cli("customer", "block", "blockme", "--reason", "complaints from recipients")
    assert r.returncode == 0, r.stderr

    def refused():
        res = swaks(m.port, frm="a@blockme.example", to="x@outside.example", bind=BLOCKME)
        return (
            res.rcpt_codes == [554] and "5.7.1 Outbound mail from blockme is blocked" in res.output
        )

    assert wait_until(refused)
    assert (
        "contact abuse@hosted.example"
        in swaks(m.port, frm="a@blockme.example", to="y@outside.example", bind=BLOCKME).output
    )
    r = swaks(m.port, frm="a@blockme.example", to="abuse@hosted.example", bind=BLOCKME)
    assert r.data_code == 250, r.output
    assert "blocked" in m.cli("customer", "show", "blockme").stdout
    assert m.cli("customer", "unblock", "blockme").returncode == 0
    assert wait_until(
        lambda: (
            swaks(m.port, frm="a@blockme.example", to="z@outside.example", bind=BLOCKME).data_code
            == 250
        )
    )


def test_counters_stored_before_the_upgrade_are_carried_over(postfix, tmp_path):
    """A state written by a maild with one counter for both windows: 2 messages stored as
    4. The daemon starts, says so in one line, and the customer has 1 message left."""
    from maild.components import open_store

    policy = front_policy(postfix.reinject_port)
    policy["customers"] += [
        {
            "name": "upgraded",
            "networks": [f"{UPGRADED}/32"],
            "ratelimit": {"messages": ["3/1h", "10/1d"]},
        }
    ]
    db = tmp_path / "state.db"

    async def old_state() -> None:
        store = await open_store(str(db))
        await store.execute(
            "INSERT INTO ratelimit_counters(key, value, ts, period) VALUES (?, ?, ?, ?)",
            ("cust:upgraded", 4.0, time.time(), 86400.0),
        )
        await store.close()

    asyncio.run(old_state())
    md = Maild(tmp_path, policy)
    md.start()
    try:
        md.wait_log("ratelimit: legacy counters=1")
        assert (
            swaks(
                md.port, frm="a@upgraded.example", to="u1@outside.example", bind=UPGRADED
            ).data_code
            == 250
        )
        r = swaks(md.port, frm="a@upgraded.example", to="u2@outside.example", bind=UPGRADED)
        assert r.rcpt_codes == [450] and "Rate limit messages (3/1h)" in r.output, r.output
    finally:
        md.stop()
    with sqlite3.connect(db) as c:
        rows = dict(
            c.execute(
                "SELECT key, value FROM ratelimit_counters WHERE key LIKE 'cust:upgraded#%' "
                "OR key = 'cust:upgraded'"
            )
        )
    assert rows.keys() == {"cust:upgraded#1d", "cust:upgraded#1h"}, rows  # the old row is gone
    assert all(2.9 < v <= 3.0 for v in rows.values()), rows  # 2 carried over, 1 sent
