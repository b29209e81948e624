"""The PROXY protocol: only from [server] trusted_proxies, and then the real client is who
policy, admission and the logs see.

The load balancer is 127.0.0.7; the real client it names is the customer's 127.0.0.9
(which may relay) or the stranger's 127.0.0.5 (which may not).
"""

from __future__ import annotations

import socket
import struct

import pytest

from tests.harness.certs import make_cert
from tests.harness.maild import Maild
from tests.harness.ports import free_port
from tests.harness.waits import wait_until
from tests.integration.conftest import CUSTOMER_IP, STRANGER, front_policy
from tests.integration.wire import client_context, reply

BALANCER = "127.0.0.7"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.fixture(scope="module")
def pp_maild(postfix, tmp_path_factory):
    root = tmp_path_factory.mktemp("maild-pp")
    cert, key = make_cert(root / "tls")
    policy = front_policy(postfix.reinject_port, trusted_proxies=[f"{BALANCER}/32"])
    implicit = free_port()
    policy["server"]["tls"] = {
        "certificate": str(cert),
        "key": str(key),
        "implicit": [f"127.0.0.1:{implicit}"],
    }
    m = Maild(root, policy)
    m.start()
    m.implicit = implicit
    yield m
    m.stop()


def v1(client: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 {port} 25\r\n".encode()


def v2(client: str, port: int = 40000) -> bytes:
    body = socket.inet_aton(client) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 25)
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def relay_attempt(port: int, source: str, header: bytes, answered: bool = False) -> list[bytes]:
    """Banner, EHLO, MAIL and RCPT to a non-hosted domain (a relay) after `header`
    (and the reply to it, when it is `answered` as a command)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as s:
        f = s.makefile("rb")
        s.sendall(header)
        out = [reply(f)]
        if answered:
            out.append(reply(f))
        for line in (
            b"EHLO client.example",
            b"MAIL FROM:<a@acme.example>",
            b"RCPT TO:<someone@elsewhere.example>",
        ):
            s.sendall(line + b"\r\n")
            out.append(reply(f))
        s.sendall(b"QUIT\r\n")
        return out


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
def test_policy_sees_the_client_the_trusted_proxy_names(pp_maild, header):
    customer = relay_attempt(pp_maild.port, BALANCER, header(CUSTOMER_IP))
    assert customer[0].startswith(b"220 "), customer
    assert customer[3].startswith(b"250 "), customer  # the customer's network may relay
    stranger = relay_attempt(pp_maild.port, BALANCER, header(STRANGER, 40001))
    assert stranger[3].startswith(b"554 5.7.1 "), stranger
    assert wait_until(lambda: f"[{STRANGER}]" in pp_maild.log())
    assert f"[{BALANCER}]" not in pp_maild.log()


def test_a_proxy_header_from_anyone_else_is_not_believed(pp_maild):
    r = relay_attempt(pp_maild.port, STRANGER, v1(CUSTOMER_IP), answered=True)
    assert r[0].startswith(b"220 ")
    assert r[1].startswith(b"500 "), r  # "PROXY ..." is just an unknown command
    assert r[4].startswith(b"554 5.7.1 "), r  # still the stranger: no relaying


def test_a_trusted_proxy_that_sends_no_header_is_closed_without_a_banner(pp_maild):
    with socket.create_connection(
        ("127.0.0.1", pp_maild.port), timeout=30, source_address=(BALANCER, 0)
    ) as s:
        s.sendall(b"EHLO client.example\r\n")
        assert s.makefile("rb").read() == b""
    assert wait_until(
        lambda: "PROXY protocol header refused from proxy 127.0.0.7" in pp_maild.log()
    )


def test_on_the_implicit_tls_listener_the_proxy_header_comes_before_the_handshake(pp_maild):
    s = socket.create_connection(
        ("127.0.0.1", pp_maild.implicit), timeout=30, source_address=(BALANCER, 0)
    )
    s.sendall(v2(CUSTOMER_IP, 40002))
    t = client_context().wrap_socket(s, server_hostname="mx.hosted.example")
    f = t.makefile("rb")
    assert reply(f).startswith(b"220 ")
    for line in (b"EHLO client.example", b"MAIL FROM:<a@acme.example>"):
        t.sendall(line + b"\r\n")
        reply(f)
    t.sendall(b"RCPT TO:<someone@elsewhere.example>\r\n")
    assert reply(f).startswith(b"250 "), "the customer's network, named by the header"
    t.close()


def test_admission_counts_the_client_the_proxy_names_not_the_proxy(pp_maild):
    """max_sessions_per_ip (20) is per real client: 21 sessions through the balancer for
    21 clients are all served (admitted at connect, by the balancer's address, the 21st
    would hear 421), and the 21st session of one client is refused."""
    held: list[socket.socket] = []

    def greeting(client: str, port: int) -> bytes:
        s = socket.create_connection(
            ("127.0.0.1", pp_maild.port), timeout=30, source_address=(BALANCER, 0)
        )
        held.append(s)
        s.sendall(v1(client, port))
        return reply(s.makefile("rb"))

    try:
        for i in range(21):
            assert greeting(f"198.51.100.{i + 1}", 41000 + i).startswith(b"220 "), i
        for s in held:
            s.close()
        held.clear()
        lines = [greeting("203.0.113.9", 42000 + i) for i in range(21)]
        assert all(x.startswith(b"220 ") for x in lines[:20]), lines
        assert lines[20].startswith(b"421 4.7.0 "), lines[20]
    finally:
        for s in held:
            s.close()
