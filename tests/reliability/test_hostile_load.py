"""Issue 15: a hostile crowd of strangers must not take maild's capacity away from
customers and postmaster.

A real Postfix downstream at Debian's default process limit (100 re-injection smtpd
processes) and a scaled-down crowd of the same shape as the audit's (tests/reliability/
hostile.py; bench/hostile.py runs the full sizes): idle stranger connections that come
back when closed, slowloris, strangers holding MAIL FROM (or MAIL and RCPT), and
concurrent 24 MB messages, all at once and all from strangers. Meanwhile a customer and a
stranger writing to postmaster each send one message a second.

maild runs with max_sessions = 150 (30 reserved), so the crowd (285 connections) is
larger than the strangers' share and stress mode, shedding and the reserved share all
come into play.

Asserted, never timings: every probe is answered 250 by Postfix (through maild) and is
delivered exactly once; maild shed idle strangers, kept its downstream connections within
the cap, logged stress starting and, after the crowd left, ending, and counts zero
sessions afterwards. Against the code before issue 15 it fails: most probes are refused
421 4.7.0 at connect (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.harness.postfix import Postfix
from tests.harness.waits import wait_until
from tests.integration.conftest import HOSTED, front_policy, need
from tests.reliability.hostile import (
    BIG_DOMAIN,
    CUSTOMER_RCPTS,
    POSTMASTER_RCPT,
    Crowd,
    CrowdProcess,
    postfix_main_cf,
    probes,
)

CROWD = Crowd(idle=200, slowloris=50, holders=30, big=5)
PROBES = 20  # messages from each probe, one a second
LIMITS = {
    "max_sessions": 150,
    "reserved_sessions": 30,
    "command_timeout": "60s",
    "data_timeout": "2m",
    "stress_command_timeout": "10s",
    "stress_data_timeout": "90s",
    "message_size": "30MB",
}


@pytest.fixture
def downstream(tmp_path: Path):
    need("postfix")
    pf = Postfix(
        tmp_path / "pf",
        hosted_domains=[*HOSTED, BIG_DOMAIN],
        hostname="host.hosted.example",
        main_cf=postfix_main_cf(),
    )
    pf.start()
    yield pf
    pf.stop()


def _policy(pf: Postfix) -> dict:
    policy = front_policy(pf.reinject_port)
    policy["server"]["limits"] = dict(LIMITS)
    policy["postmaster"]["domains"] = ["hosted.example", BIG_DOMAIN]
    return policy


def _status(m) -> dict:
    return json.loads(m.cli("status", "--json", check=True).stdout)


def test_customers_and_postmaster_get_through_a_hostile_crowd(downstream, maild_factory):
    m = maild_factory(_policy(downstream))
    with CrowdProcess(m.port, CROWD) as crowd:
        assert crowd.wait_ready(180), "the crowd never got in"
        results = asyncio.run(probes(m.port, 0, count=PROBES))
        limits = _status(m).get("limits", {})
        stats = crowd.stop()
    refused = [r for r in results if r.code != 250]
    assert not refused, "\n".join(f"{r.who}: {r.code} {r.reply}" for r in refused)
    assert len(results) == 2 * PROBES
    # Each accepted probe delivered exactly once (by its unique Subject).
    for rcpts, who in ((CUSTOMER_RCPTS, "customer"), ((POSTMASTER_RCPT,), "postmaster")):
        subjects = {r.subject for r in results if r.who == who}

        def delivered(rcpts: tuple[str, ...] = rcpts) -> list[str]:
            out = []
            for rcpt in rcpts:
                for raw in downstream.messages(rcpt):
                    for line in raw.split(b"\n"):
                        if line.startswith(b"Subject: "):
                            out.append(line[9:].strip().decode())
            return out

        assert wait_until(lambda s=subjects, d=delivered: s <= set(d()), timeout=60), (
            f"a {who} probe accepted and never delivered"
        )
        got = delivered()
        assert sorted(got) == sorted(subjects), f"{who}: lost or duplicated"
    # The crowd really was there and maild defended itself: it shed idle strangers and
    # went into stress mode (which may have ended and restarted as the crowd's sessions
    # timed out together); the downstream stayed within its cap.
    assert stats.get("mail 250", 0) >= CROWD.holders
    assert limits["admission"]["shed"] > 0
    assert limits["downstream"]["in_use"] <= limits["downstream"]["max"]
    assert "stress: started" in m.log()
    assert wait_until(lambda: _status(m)["sessions"] == 0, timeout=60), "sessions left over"
    assert wait_until(lambda: "stress: ended" in m.log(), timeout=30), "stress never ended"
