"""The DNS server maild asks goes down, or answers too slowly, and comes back.

A customer's mail is checked in DNS (does the sender domain, and the From: domain,
receive mail?). When DNS cannot answer, the only correct reply is a 4xx: a 250 would let
the message through unchecked, a 5xx would bounce mail that is probably fine. Mail that
no DNS check applies to (inbound mail from strangers, by default) must not suffer. When
DNS is back, maild recovers by itself (failures are cached for `error_ttl` only) and the
customer's retry is delivered exactly once.

The DNS server is the loopback test server of tests/harness/dns.py (real DNS over real
sockets), started privately here so it can be stopped and slowed down; the checks run in
enforce mode (front_policy's default elsewhere is tag mode).
"""

from __future__ import annotations

import socket
import threading
import time
from email.utils import format_datetime, localtime

import pytest

from tests.harness.dns import STANDARD_ZONE, DnsServer
from tests.integration.conftest import CUSTOMER_IP, HOSTED, STRANGER, front_policy
from tests.reliability.helpers import Attempt, attempt, copies, settle, unique_subject, wait_for

HELO = "mail.acme.example"
EXTRA = """
down.acme.example.  3600 IN MX 10 mx.acme.example.
slow.acme.example.  3600 IN MX 10 mx.acme.example.
ok.acme.example.    3600 IN MX 10 mx.acme.example.
"""


class FaultyDns(DnsServer):
    """The standard test zone, with a switchable delay, that can be stopped and restarted
    on the same port (maild keeps its configured nameserver)."""

    def __init__(self) -> None:
        super().__init__(STANDARD_ZONE + EXTRA)
        self.delay = 0.0

    def answer(self, wire: bytes) -> bytes | None:
        if self.delay:
            time.sleep(self.delay)
        return super().answer(wire)

    def restart(self) -> None:
        self._stop = threading.Event()
        self._threads = []
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.bind((self.host, self.port))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((self.host, self.port))
        tcp.listen(16)
        self._udp, self._tcp = udp, tcp
        for target in (self._serve_udp, self._serve_tcp):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)


@pytest.fixture
def dns():
    d = FaultyDns().start()
    yield d
    d.delay = 0
    d.stop()


@pytest.fixture
def setup(postfix_factory, maild_factory, dns):
    pf = postfix_factory(hosted_domains=HOSTED)
    policy = front_policy(pf.reinject_port)
    policy["headers"] = {"mode": "enforce"}
    policy["dns"] = {"nameservers": [dns.nameserver], "timeout": "1s", "error_ttl": "1s"}
    policy["sanctions"] = {"ladder": ["warn"], "notify": False}
    return pf, maild_factory(policy)


def customer_message(subject: str, sender: str) -> bytes:
    return (
        f"From: Boss <{sender}>\r\nTo: partner@outside.example\r\nSubject: {subject}\r\n"
        f"Date: {format_datetime(localtime())}\r\n"
        f"Message-ID: <{subject}@{sender.split('@')[1]}>\r\n\r\nquarterly figures\r\n"
    ).encode()


def as_customer(port: int, subject: str, sender: str) -> Attempt:
    return attempt(
        port,
        sender=sender,
        rcpts=["partner@outside.example"],
        data=customer_message(subject, sender),
        source=CUSTOMER_IP,
        helo=HELO,
    )


def inbound(port: int, subject: str) -> Attempt:
    return attempt(
        port,
        sender="someone@elsewhere.example",
        rcpts=["bob@hosted.example"],
        data=customer_message(subject, "someone@elsewhere.example"),
        source=STRANGER,
    )


def assert_dns_tempfail(a: Attempt) -> None:
    assert not a.accepted, f"accepted unchecked while DNS was failing: {a}"
    assert a.final is not None and 400 <= a.final < 500, f"not a 4xx: {a}"
    assert "4.4.3" in a.text, a


def outside_copies(pf, needle: str) -> int:
    return sum(needle.encode() in m for m in pf.outside_messages())


def retry_until_accepted(port: int, subject: str, sender: str, tries: int = 20) -> Attempt:
    """A client retrying (quickly: maild caches a DNS failure for error_ttl = 1 s)."""
    for _ in range(tries):
        a = as_customer(port, subject, sender)
        if a.accepted:
            return a
        assert a.temporary, f"refused for good after DNS came back: {a}"
        time.sleep(0.5)
    raise AssertionError(f"still not accepted after {tries} tries: {a}")


def test_dns_down_is_451_for_customers_only_and_recovers(setup, dns):
    pf, m = setup
    dns.stop()
    subj = unique_subject("dns-down")
    a = as_customer(m.port, subj, "boss@down.acme.example")
    assert_dns_tempfail(a)
    b = inbound(m.port, unique_subject("dns-down-inbound"))
    assert b.accepted, f"inbound mail suffered from the DNS outage: {b}"
    m.wait_log("dns: warning:")
    assert m.proc.poll() is None
    dns.restart()
    retry_until_accepted(m.port, subj, "boss@down.acme.example")
    settle(pf)
    assert outside_copies(pf, subj) == 1
    assert copies(pf, "bob@hosted.example", "dns-down-inbound") == 1


def test_dns_slower_than_timeout_is_451_and_recovers(setup, dns):
    pf, m = setup
    dns.delay = 0.3  # slow, but within maild's 1 s: accepted
    fine = unique_subject("dns-slow-ok")
    assert as_customer(m.port, fine, "boss@ok.acme.example").accepted
    dns.delay = 2.5  # slower than the timeout
    subj = unique_subject("dns-slow")
    assert_dns_tempfail(as_customer(m.port, subj, "boss@slow.acme.example"))
    m.wait_log("timeout after 1s")
    dns.delay = 0
    retry_until_accepted(m.port, subj, "boss@slow.acme.example")
    settle(pf)
    assert outside_copies(pf, subj) == 1
    assert outside_copies(pf, fine) == 1
    wait_for(lambda: m.proc.poll() is None, "maild alive")
