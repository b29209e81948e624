"""Before-queue mode: Postfix's own smtpd_proxy_filter hands sessions to maild.

client -> Postfix public smtpd (SASL via a private Dovecot) -> maild (XFORWARD) ->
Postfix re-injection smtpd -> Maildir. Postfix's mynetworks includes the stranger's
127.0.0.5, so Postfix itself would relay for it: maild is what refuses.
"""

from __future__ import annotations

import re

import pytest

from tests.harness.clients import swaks
from tests.harness.maild import Maild
from tests.harness.ports import free_port
from tests.harness.postfix import Postfix
from tests.integration.conftest import HOSTED, STRANGER, front_policy, need


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    need("postfix", "swaks", "dovecot")
    root = tmp_path_factory.mktemp("bq")
    port = free_port()
    pf = Postfix(
        root / "pf",
        hosted_domains=HOSTED,
        hostname="host.hosted.example",
        proxy_filter=f"127.0.0.1:{port}",
        proxy_timeout="100s",
        sasl_users={"alice": "secret"},
        main_cf={"smtpd_sasl_authenticated_header": "yes"},
    )
    policy = front_policy(pf.reinject_port, mode="before-queue", trusted_upstreams=["127.0.0.1/32"])
    m = Maild(root / "maild", policy, port=port)
    m.start()
    pf.start()
    yield pf, m
    pf.stop()
    m.stop()


def test_delivered_through_postfix_proxy_filter_with_real_client(stack):
    pf, m = stack
    r = swaks(
        pf.smtpd_port,
        frm="someone@outside.example",
        to="bob@hosted.example",
        bind=STRANGER,
        helo="client.example",
        header=["Subject: through the filter"],
    )
    assert r.data_code == 250 and r.queue_id, r.output
    msg = pf.wait_for_messages("bob@hosted.example", 1)[-1]
    # maild's Received names the client Postfix reported with XFORWARD, not Postfix itself
    assert re.search(
        rb"Received: from client\.example \(\S+ \[127\.0\.0\.5\]\)\r?\n\tby mx\.hosted\.example \(maild\)",
        msg,
    ), msg[:1000]
    # and maild passed XFORWARD on, so the re-injection smtpd logs the real client too
    pf.wait_for_log(
        r"postfix/reinject/smtpd\[\d+\]: \w+: client=\S+, orig_client=\S*\[127\.0\.0\.5\]"
    )
    m.wait_log("relay: DATA from ")
    assert re.search(r"relay: DATA from \S*\[127\.0\.0\.5\]", m.log())


def test_unauthenticated_relay_refused_at_end_of_data(stack):
    pf, m = stack
    before = len(pf.outside_messages())
    r = swaks(
        pf.smtpd_port, frm="spam@outside.example", to="victim@elsewhere.example", bind=STRANGER
    )
    assert r.rcpt_codes == [250], r.output  # provisional: the login is only known at end of data
    assert r.data_code == 554 and "5.7.1" in (r.data_reply or ""), r.output
    pf.wait_queue_empty()
    assert len(pf.outside_messages()) == before
    m.wait_log("reject: DATA from")


def test_authenticated_login_relays_and_is_named(stack):
    pf, m = stack
    before = len(pf.outside_messages())
    r = swaks(
        pf.smtpd_port,
        frm="alice@acme.example",
        to="partner@elsewhere.example",
        bind="127.0.0.77",
        auth=("alice", "secret"),
    )
    assert r.data_code == 250, r.output
    pf.wait_for_outside(before + 1)
    log = m.wait_log("to=<partner@elsewhere.example>")
    assert re.search(r"relay: DATA from \S*\[127\.0\.0\.77\]: 250 .*customer=acme by=login", log), (
        log[-2000:]
    )


def test_postmaster_through_the_filter(stack):
    pf, m = stack
    r = swaks(pf.smtpd_port, frm="<>", to="postmaster@hosted.example", bind=STRANGER)
    assert r.data_code == 250, r.output
    pf.wait_for_messages("postmaster@hosted.example", 1)
