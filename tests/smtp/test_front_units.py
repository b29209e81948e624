"""Pure pieces of front mode: [server.tls]/[server.auth] parsing, SASL PLAIN decoding,
the failed-login window, the Received line over TLS, the server TLS context."""

from __future__ import annotations

import base64
import ssl

import pytest

from maild.config import ConfigError, parse
from maild.policy.context import Client
from maild.smtp.received import received_header
from maild.smtp.sasl import Failures, parse_plain
from maild.smtp.tls import TLSConfigError, build_context, describe
from tests.harness.certs import make_cert


def server(**keys: object) -> dict:
    return {"server": {"mode": "front", **keys}}


def problems(doc: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(doc)
    return e.value.problems


def test_tls_and_auth_keys_are_parsed_with_their_defaults():
    c = parse(
        server(
            trusted_proxies=["192.0.2.10"],
            tls={
                "certificate": "/c.pem",
                "key": "/k.pem",
                "implicit": ["0.0.0.0:465"],
                "submission": [":587"],
            },
            auth={"dovecot": "/var/spool/postfix/private/auth"},
        )
    )
    tls, auth = c.server.tls, c.server.auth
    assert tls.implicit == (("0.0.0.0", 465),) and tls.submission == (("0.0.0.0", 587),)
    assert (tls.security_level, tls.customers, tls.min_protocol) == ("may", "may", "TLSv1.2")
    assert (auth.max_failures, auth.failure_window) == (5, 600.0)
    assert str(c.server.trusted_proxies[0]) == "192.0.2.10/32"
    assert not parse(server()).server.tls.enabled


def test_bad_tls_and_auth_keys_are_each_named():
    p = problems(
        server(
            tls={"certificate": "/c.pem", "implicit": ["465"], "min_protocol": "TLSv1"},
            auth={"dovecot": "/run/auth", "max_failures": "five"},
        )
    )
    text = "\n".join(p)
    assert "server.tls.key is missing" in text
    assert 'server.tls.implicit[0] = "465"' in text
    assert 'server.tls.min_protocol = "TLSv1"' in text
    assert 'server.auth.max_failures = "five"' in text
    assert "AUTH is offered over TLS only" in "\n".join(
        problems(server(auth={"dovecot": "/run/auth"}))
    )


def test_plain_response_is_login_and_password_and_no_one_acts_as_another():
    enc = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    assert parse_plain(enc("\0alice\0pw")) == ("alice", "pw")
    assert parse_plain(enc("alice\0alice\0pw")) == ("alice", "pw")
    assert parse_plain(enc("bob\0alice\0pw")) is None
    assert parse_plain(enc("\0alice\0")) is None
    assert parse_plain("not base64!") is None


def test_failures_count_per_address_and_per_login_within_the_window():
    now = [0.0]
    f = Failures(
        parse(
            server(
                auth={"dovecot": "x", "max_failures": "2/1m"}, tls={"certificate": "c", "key": "k"}
            )
        ).server.auth,
        clock=lambda: now[0],
    )
    f.failed("192.0.2.1", "Alice")
    assert not f.blocked(addr="192.0.2.1") and not f.blocked(login="alice")
    f.failed("192.0.2.2", "alice")
    assert f.blocked(login="ALICE") and not f.blocked(addr="192.0.2.1")
    now[0] = 61.0
    assert not f.blocked(login="alice")


def test_received_over_tls_says_using_and_esmtps_or_esmtpsa():
    c = Client(addr="203.0.113.9", helo="client", proto="ESMTP")
    using = "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
    h = received_header(c, "mx", "ID", [], "date", tls=using).decode()
    assert h.startswith(
        "Received: from client (unknown [203.0.113.9])\r\n"
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
        "\tby mx (maild) with ESMTPS id ID;"
    ), h
    assert (
        "with ESMTPSA id"
        in received_header(c, "mx", "ID", [], "date", tls=using, authenticated=True).decode()
    )
    assert "with ESMTP id" in received_header(c, "mx", "ID", [], "date").decode()


def test_server_context_refuses_old_protocols_and_compression(tmp_path):
    cert, key = make_cert(tmp_path)
    tls = parse(server(tls={"certificate": str(cert), "key": str(key)})).server.tls
    ctx = build_context(tls)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert describe(None) == ""
    other_cert, other_key = make_cert(tmp_path / "o", cn="other.example")
    bad = parse(server(tls={"certificate": str(cert), "key": str(other_key)})).server.tls
    with pytest.raises(TLSConfigError, match="does not match the certificate"):
        build_context(bad)
