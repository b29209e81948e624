"""SMTP AUTH in front mode against a real Dovecot auth service (passwd-file users).

alice is the acme customer's login (its [[customers]] logins); bob is a Dovecot user no
customer owns. AUTH is over TLS only; failed logins are limited per address and login.
"""

from __future__ import annotations

import base64

import pytest

from tests.harness.certs import make_cert
from tests.harness.clients import swaks
from tests.harness.maild import Maild
from tests.harness.waits import wait_until
from tests.integration.conftest import AUTH_PASSWORD, STRANGER, front_policy
from tests.integration.wire import reply, session, starttls

PASSWORD = AUTH_PASSWORD


@pytest.fixture(scope="module")
def auth_maild(postfix, dovecot, tmp_path_factory):
    root = tmp_path_factory.mktemp("maild-auth")
    cert, key = make_cert(root / "tls")
    policy = front_policy(postfix.reinject_port)
    policy["server"]["tls"] = {"certificate": str(cert), "key": str(key)}
    policy["server"]["auth"] = {
        "dovecot": f"inet:127.0.0.1:{dovecot.port}",
        "max_failures": "3/10m",
    }
    m = Maild(root, policy)
    m.start()
    yield m
    m.stop()


def tls_session(port: int, source: str):
    t, tf, ehlo = starttls(port, source)
    assert b"250-AUTH PLAIN LOGIN" in ehlo, ehlo
    return t, tf


def plain(login: str, password: str) -> bytes:
    return base64.b64encode(f"\0{login}\0{password}".encode())


def test_swaks_auth_plain_over_tls_relays_as_the_customer_of_the_login(postfix, auth_maild):
    r = swaks(
        auth_maild.port,
        frm="alice@acme.example",
        to="friend@elsewhere.example",
        bind=STRANGER,  # not a customer network: only the login lets it relay
        auth=("alice", PASSWORD),
        extra=["-tls"],
    )
    assert r.ok, r.output
    assert "235 2.7.0 Authentication successful" in r.output
    msgs = wait_until(lambda: postfix.outside_messages(), timeout=30)
    assert msgs and b"with ESMTPSA id" in msgs[-1], msgs
    assert wait_until(lambda: "sasl_method=PLAIN sasl_username=alice" in auth_maild.log())


def test_swaks_auth_login_is_checked_by_dovecot_too(auth_maild):
    r = swaks(
        auth_maild.port,
        frm="alice@acme.example",
        to="x@hosted.example",
        bind=STRANGER,
        auth=("alice", PASSWORD),
        auth_type="LOGIN",
        extra=["-tls"],
        quit_after="AUTH",
    )
    assert "235 2.7.0 Authentication successful" in r.output, r.output


def test_auth_is_neither_offered_nor_accepted_in_clear_text(auth_maild):
    s, f = session(auth_maild.port)
    with s:
        s.sendall(b"EHLO client.example\r\n")
        assert b"AUTH" not in reply(f)
        s.sendall(b"AUTH PLAIN " + plain("alice", PASSWORD) + b"\r\n")
        assert reply(f).startswith(b"538 5.7.11 Encryption required")


def test_a_login_dovecot_accepts_but_no_customer_owns_may_not_relay(auth_maild):
    t, tf = tls_session(auth_maild.port, STRANGER)
    t.sendall(b"AUTH PLAIN " + plain("bob", "bobpw") + b"\r\n")
    assert reply(tf).startswith(b"235 ")
    t.sendall(b"MAIL FROM:<bob@outside.example>\r\nRCPT TO:<x@elsewhere.example>\r\n")
    reply(tf)
    assert reply(tf).startswith(b"554 5.7.1 ")
    t.close()


def test_failed_logins_are_logged_without_the_password_and_limited(auth_maild):
    source = "127.0.0.44"
    for _ in range(3):
        t, tf = tls_session(auth_maild.port, source)
        t.sendall(b"AUTH PLAIN " + plain("alice", "wrong-guess-pw") + b"\r\n")
        assert reply(tf).startswith(b"535 5.7.8 Error: authentication failed")
        t.close()
    t, tf = tls_session(auth_maild.port, source)
    t.sendall(b"AUTH PLAIN " + plain("alice", PASSWORD) + b"\r\n")
    assert reply(tf).startswith(b"421 4.7.0 "), "the address is over its failures"
    t.close()
    # alice's failures count for her login from any address: the right password from
    # elsewhere is refused too, without asking Dovecot
    t, tf = tls_session(auth_maild.port, "127.0.0.45")
    t.sendall(b"AUTH PLAIN " + plain("alice", PASSWORD) + b"\r\n")
    assert reply(tf).startswith(b"535 5.7.8 ")
    t.close()
    log = auth_maild.log()
    failures = [line for line in log.splitlines() if "SASL PLAIN authentication failed" in line]
    assert len(failures) == 4, failures
    assert all("login=alice" in line for line in failures)
    assert "wrong-guess-pw" not in log and PASSWORD not in log
    assert base64.b64encode(b"wrong-guess-pw").decode() not in log


def test_the_dovecot_auth_unix_socket_works_as_the_tcp_port_does(postfix, dovecot, tmp_path):
    cert, key = make_cert(tmp_path / "tls")
    policy = front_policy(postfix.reinject_port)
    policy["server"]["tls"] = {"certificate": str(cert), "key": str(key)}
    policy["server"]["auth"] = {"dovecot": str(dovecot.client_socket)}
    with Maild(tmp_path / "m", policy) as m:
        r = swaks(
            m.port,
            frm="alice@acme.example",
            to="x@hosted.example",
            bind=STRANGER,
            auth=("alice", PASSWORD),
            extra=["-tls"],
            quit_after="AUTH",
        )
        assert "235 2.7.0 Authentication successful" in r.output, r.output + m.log()


def test_help_lists_starttls_and_auth_when_they_are_on(auth_maild):
    s, f = session(auth_maild.port)
    with s:
        s.sendall(b"HELP\r\n")
        listed = reply(f).decode()
        assert "AUTH" in listed and "STARTTLS" in listed, listed
