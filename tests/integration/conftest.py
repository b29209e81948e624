"""A real Postfix and a real `maild serve`, wired in front mode, shared per test module.

Customer 'acme' owns network 127.0.0.9/32 and domain acme.example; the stranger used by
the tests connects from 127.0.0.5 (swaks --li / smtplib source_address). Only 127.0.0.1
is a trusted upstream here, so the stranger may not send XFORWARD.
"""

from __future__ import annotations

import smtplib

import pytest

from tests.harness import require_binary, require_root
from tests.harness.dns import shared_server as shared_dns_server
from tests.harness.maild import Maild
from tests.harness.postfix import DovecotAuth, Postfix

STRANGER = "127.0.0.5"
CUSTOMER_IP = "127.0.0.9"
HOSTED = ["hosted.example", "host.hosted.example"]


def need(*binaries: str) -> None:
    """Skip locally, fail under CI=true, when a program or root is missing."""
    for b in binaries:
        require_binary(b)
    require_root()


AUTH_PASSWORD = "s3cret-Pass"  # alice's, the acme customer's login


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory):
    """A real Dovecot auth service: alice (acme's login) and bob (no customer's)."""
    need("dovecot")
    d = DovecotAuth(tmp_path_factory.mktemp("dovecot"), {"alice": AUTH_PASSWORD, "bob": "bobpw"})
    d.start()
    yield d
    d.stop()


def front_policy(downstream_port: int, **server: object) -> dict:
    return {
        "server": {
            "mode": "front",
            "downstream": f"127.0.0.1:{downstream_port}",
            "trusted_upstreams": ["127.0.0.1/32"],
            "downstream_timeout": "20s",
            **server,
        },
        "postmaster": {"domains": ["hosted.example"], "hostnames": ["host.hosted.example"]},
        "customers": [
            {
                "name": "acme",
                "networks": [f"{CUSTOMER_IP}/32"],
                "logins": ["alice"],
                "domains": ["acme.example"],
                "contact": "ops@acme.example",
            }
        ],
        # DNS from a loopback server this test process runs (never the internet), and the
        # forged-header checks in tag mode: swaks greets with the bare machine name, which
        # they refuse. test_forged_headers.py sets "enforce" where it tests them.
        "dns": {"nameservers": [shared_dns_server().nameserver], "timeout": "3s"},
        "headers": {"mode": "tag"},
    }


@pytest.fixture(scope="module")
def postfix(tmp_path_factory):
    need("postfix", "swaks")
    pf = Postfix(
        tmp_path_factory.mktemp("pf"), hosted_domains=HOSTED, hostname="host.hosted.example"
    )
    pf.start()
    yield pf
    pf.stop()


@pytest.fixture(scope="module")
def maild(postfix, tmp_path_factory):
    m = Maild(tmp_path_factory.mktemp("maild"), front_policy(postfix.reinject_port))
    m.start()
    yield m
    m.stop()


def smtp(port: int, source: str = STRANGER, helo: str = "client.example") -> smtplib.SMTP:
    """A real SMTP client session from a chosen loopback address."""
    s = smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=30, source_address=(source, 0))
    s.ehlo(helo)
    return s
