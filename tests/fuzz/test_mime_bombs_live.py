"""MIME and header bombs sent by a customer through a real `maild serve` (smtp-sink behind
it): every one gets a verdict with a proper code (250, or a 5xx with an enhanced status
code; never the 451 4.3.0 of an internal error), maild stays up and its memory bounded.

Customers get the full treatment (forged-header checks, the bulk signature of the body),
so that is where hostile content costs the most. test_message_fuzz.py pins the causes.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.fuzz.test_message_fuzz import many_parts, nested_multipart
from tests.integration.conftest import CUSTOMER_IP, front_policy
from tests.reliability.helpers import Attempt, attempt, rss_kb

PROPER = re.compile(r"^[25]\.\d{1,3}\.\d{1,3} ")


def send(m, data: bytes) -> tuple[Attempt, float]:
    t0 = time.monotonic()
    a = attempt(
        m.port,
        sender="boss@acme.example",
        rcpts=["partner@outside.example"],
        data=data,
        source=CUSTOMER_IP,
        helo="mail.acme.example",
        timeout=300,
    )
    return a, time.monotonic() - t0


def assert_verdict(a: Attempt) -> None:
    assert a.final is not None and a.final // 100 in (2, 5), a
    assert PROPER.match(a.text), a


@pytest.fixture
def live(smtp_sink_factory, maild_factory):
    sink = smtp_sink_factory()
    return maild_factory(front_policy(sink.port))


def test_header_and_part_floods_get_a_verdict(live, record_property):
    """100,000 header fields (1.3 MB) and 3,000 MIME parts: judged, answered, survived."""
    hdrs = (
        b"".join(b"X-H%d: v\r\n" % i for i in range(100_000))
        + b"From: boss@acme.example\r\nSubject: flood\r\n\r\nbody\r\n"
    )
    a, t_hdrs = send(live, hdrs)
    assert_verdict(a)
    b, t_parts = send(live, many_parts(3000))
    assert_verdict(b)
    assert live.proc.poll() is None
    rss, hwm = rss_kb(live.proc.pid)
    record_property(
        "bombs",
        {
            "header_flood_s": round(t_hdrs, 2),
            "parts_3000_s": round(t_parts, 2),
            "rss_mb": rss // 1024,
            "peak_mb": hwm // 1024,
        },
    )
    assert hwm < 400 * 1024


def test_deep_nesting_gets_a_verdict(live):
    """Through maild: a customer's 2,000-level nested multipart gets a verdict, not the 451
    4.3.0 of an internal error (BUG-8)."""
    a, _ = send(live, nested_multipart(2000))
    assert_verdict(a)
    assert live.proc.poll() is None


def test_encoded_word_bomb_keeps_memory_bounded(live):
    """Through maild: one customer message whose From: holds 3,000 encoded words (57 KB,
    folded) may not raise maild's peak RSS by 100 MB (BUG-9: it went 44 -> 253 MB)."""
    before = rss_kb(live.proc.pid)[1]
    bomb = (
        b"From: " + b"\r\n ".join([b"=?utf-8?q?=C3=A9?="] * 3000) + b" <boss@acme.example>"
        b"\r\nSubject: words\r\n\r\nbody\r\n"
    )
    a, _ = send(live, bomb)
    assert_verdict(a)
    hwm = rss_kb(live.proc.pid)[1]
    assert hwm - before < 100 * 1024, f"peak RSS {before // 1024} -> {hwm // 1024} MB"
