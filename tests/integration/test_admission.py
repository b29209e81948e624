"""Admission control through `maild serve` (issue 15): who gets a session slot when the
strangers' share is full, what the closed session hears, and the log line.

max_sessions = 4 with 1 reserved: strangers share 3 slots.
"""

from __future__ import annotations

import socket

from tests.harness.maild import Maild
from tests.harness.waits import wait_until
from tests.integration.conftest import CUSTOMER_IP, STRANGER, front_policy


def _greeted(port: int, src: str) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(src, 0))
    banner = s.recv(512)
    if banner.startswith(b"220"):
        s.sendall(b"EHLO crowd.example\r\n")
        s.recv(2048)
    return s, banner


def _closed_with(s: socket.socket) -> bytes | None:
    """What the server said before closing, or None while the session is open."""
    s.setblocking(False)
    try:
        data = s.recv(512)
    except BlockingIOError:
        return None
    return data or b"closed"


def test_a_full_strangers_share_makes_room_for_a_newcomer_and_a_customer(postfix, tmp_path):
    policy = front_policy(postfix.reinject_port)
    policy["server"]["limits"] = {"max_sessions": 4, "reserved_sessions": 1}
    with Maild(tmp_path / "m", policy) as m:
        crowd = [_greeted(m.port, "127.0.0.20")[0] for _ in range(3)]
        # the crowd's address already holds the strangers' share: refused, nobody shed
        s, banner = _greeted(m.port, "127.0.0.20")
        assert banner.startswith(b"421 4.7.0 ") and b"Too many sessions in progress" in banner
        s.close()
        # a stranger from an address of its own (writing to postmaster, say) gets in,
        # and one of the crowd's idle sessions is closed to make room
        newcomer, banner = _greeted(m.port, STRANGER)
        assert banner.startswith(b"220"), banner
        said = wait_until(
            lambda: next((x for c in crowd if (x := _closed_with(c))), None), timeout=10
        )
        assert (
            said is not None
            and said.startswith(b"421 4.7.0 ")
            and b"Server busy: closing idle sessions to make room" in said
        ), said
        # a customer at the full house gets the reserved slot
        customer, banner = _greeted(m.port, CUSTOMER_IP)
        assert banner.startswith(b"220"), banner
        log = m.wait_log("rule=stress")
        assert "warning: stress: started: sessions=" in log
        assert "tempfail: CONNECT from unknown[127.0.0.20]: 421 4.7.0 Server busy" in log
        for c in (*crowd, newcomer, customer):
            c.close()
        m.wait_log("stress: ended after")
