"""`[server] workers = 2` with what front mode faces the internet with, in front of real
Postfix and a real Dovecot auth service: the implicit-TLS and submission listeners are
served by every worker, failed logins are limited for the host (not per worker), and a
customer from a [customer_source] file reaches every worker without a reload.
"""

from __future__ import annotations

import base64
import re
import secrets
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.customers.conftest import write_customer
from tests.harness.certs import make_cert
from tests.harness.clients import swaks
from tests.harness.maild import Maild
from tests.harness.ports import free_port
from tests.harness.waits import wait_until
from tests.integration.conftest import STRANGER, front_policy
from tests.integration.test_workers import running
from tests.integration.wire import reply, starttls

MAX_FAILURES = 3


@pytest.fixture(scope="module")
def m(postfix, dovecot, tmp_path_factory):
    root = tmp_path_factory.mktemp("maild-workers-front")
    cert, key = make_cert(root / "tls")
    customers = root / "customers.d"
    customers.mkdir()
    policy = front_policy(postfix.reinject_port, workers=2)
    policy["server"]["tls"] = {
        "certificate": str(cert),
        "key": str(key),
        "implicit": [f"127.0.0.1:{free_port()}"],
        "submission": [f"127.0.0.1:{free_port()}"],
    }
    policy["server"]["auth"] = {
        "dovecot": f"inet:127.0.0.1:{dovecot.port}",
        "max_failures": f"{MAX_FAILURES}/10m",
    }
    policy["customer_source"] = {"type": "files", "path": str(customers), "refresh": "1s"}
    md = Maild(root / "m", policy)
    md.start()
    assert wait_until(lambda: len(running(md)) == 2, timeout=30)
    md.customers_dir = customers
    yield md
    md.stop()


def port_of(m: Maild, kind: str) -> int:
    return int(m.policy["server"]["tls"][kind][0].rsplit(":", 1)[1])


def pids_logging(m: Maild, text: str, since: int = 0) -> set[int]:
    return {int(p) for p in re.findall(rf"maild\[(\d+)\]: [^\n]*{text}", m.log()[since:])}


def unique_body() -> str:
    """A body of its own: copies of one would be bulk to the campaign score."""
    return " ".join(secrets.token_hex(4) for _ in range(60))


def in_parallel(fn, n: int) -> list:
    with ThreadPoolExecutor(10) as pool:
        return list(pool.map(fn, range(n)))


def test_the_implicit_tls_listener_is_served_by_every_worker(postfix, m):
    before = len(postfix.outside_messages())
    mark = len(m.log())

    def one(i: int) -> str:
        r = swaks(
            port_of(m, "implicit"),
            frm="boss@acme.example",
            to=f"tls{i}@outside.example",
            bind="127.0.0.9",
            body=unique_body(),
            extra=["--tls-on-connect"],
        )
        return "" if r.ok else r.output

    failed = [out for out in in_parallel(one, 30) if out]
    assert not failed, failed[0]
    got = postfix.wait_for_outside(before + 30)
    assert len(got) == before + 30
    assert all(b"with ESMTPS id" in x for x in got[before:])
    assert pids_logging(m, ": relay:", mark) == set(running(m))


def test_the_submission_listener_requires_starttls_in_every_worker(m):
    def one(_: int) -> bytes:
        t, tf, ehlo = starttls(port_of(m, "submission"), STRANGER)
        with t:
            return ehlo

    assert all(b"250-AUTH PLAIN LOGIN" in ehlo for ehlo in in_parallel(one, 10))


def test_failed_logins_are_counted_for_the_host_not_per_worker(m):
    """After MAX_FAILURES failures, whichever worker takes the next login refuses it
    (with one count per worker, the other worker would still ask Dovecot)."""
    source = "127.0.0.46"
    wrong = base64.b64encode(b"\0alice\0wrong-guess-pw")
    for _ in range(MAX_FAILURES):
        t, tf, _ehlo = starttls(m.port, source)
        with t:
            t.sendall(b"AUTH PLAIN " + wrong + b"\r\n")
            assert reply(tf).startswith(b"535 5.7.8 ")
    mark = len(m.log())
    refused = "SASL PLAIN refused: too many failed logins"
    for _ in range(40):  # until both workers have refused one (which serves which is the kernel's)
        t, tf, _ehlo = starttls(m.port, source)
        with t:
            t.sendall(b"AUTH PLAIN " + wrong + b"\r\n")
            assert reply(tf).startswith(b"421 4.7.0 "), "a worker asked Dovecot again"
        if pids_logging(m, refused, mark) == set(running(m)):
            break
    assert pids_logging(m, refused, mark) == set(running(m))
    assert m.log().count("SASL PLAIN authentication failed") == MAX_FAILURES


def test_a_customer_file_reaches_every_worker_without_a_reload(postfix, m):
    write_customer(
        m.customers_dir, "newcomer", 'networks = ["127.0.0.12/32"]\ndomains = ["new.example"]\n'
    )
    # every process publishes its own index from the source: wait for all three
    assert wait_until(
        lambda: len(pids_logging(m, r"customers: in force: 2 \(policies.toml=1 files=1\)")) == 3,
        timeout=60,
    ), m.log()[-3000:]
    before = len(postfix.outside_messages())
    mark = len(m.log())

    def one(i: int) -> int:
        to = f"n{i}@outside.example"
        r = swaks(m.port, frm="a@new.example", to=to, bind="127.0.0.12", body=unique_body())
        return r.data_code

    assert in_parallel(one, 20) == [250] * 20
    assert len(postfix.wait_for_outside(before + 20)) == before + 20
    assert pids_logging(m, "customer=newcomer by=network", mark) == set(running(m))
