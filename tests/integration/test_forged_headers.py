"""Forged headers through a real `maild serve` and a real Postfix, DNS from a loopback server.

Customer acme (network 127.0.0.9, domain acme.example) submits with swaks; the checks run
in enforce mode here (front_policy's default for other tests is tag mode). Sanctions only
warn, so one test's strike does not block acme for the next. newsco (127.0.0.34) runs a
list on the provider's domain and otherco (127.0.0.35) does not; neither is struck
elsewhere, so their sanction lines are the list test's own.
"""

from __future__ import annotations

import re
import signal
import time
import uuid

import pytest

from tests.harness.clients import swaks
from tests.harness.maild import Maild, render
from tests.harness.ports import free_port
from tests.harness.postfix import Postfix
from tests.harness.waits import patience, wait_until
from tests.integration.conftest import CUSTOMER_IP, HOSTED, STRANGER, front_policy, need, smtp

HELO = "mail.acme.example"
NEWSCO, OTHERCO = "127.0.0.34", "127.0.0.35"
GRANT = """
[[customers.permitted]]
domain = "bank.example"
granted_by = "M. Banker, bank.example legal, letter of 2024-05-02"
fields = ["from"]
"""


class PolicyMaild(Maild):
    """Maild whose policies.toml may end with raw TOML (arrays of tables in a customer)."""

    extra = ""

    def write(self) -> None:
        self.config.write_text(render(self.policy) + self.extra)


def enforcing(port: int, **headers: object) -> dict:
    p = front_policy(port)
    p["headers"] = {"mode": "enforce", **headers}
    p["dns"]["timeout"] = "1s"
    p["sanctions"] = {"ladder": ["warn"], "notify": False}
    # before acme: PolicyMaild.extra's [[customers.permitted]] belongs to the last customer
    p["customers"] = [
        {"name": "newsco", "networks": [f"{NEWSCO}/32"], "domains": ["newsco.example"]},
        {"name": "otherco", "networks": [f"{OTHERCO}/32"]},
        *p["customers"],
    ]
    return p


@pytest.fixture(scope="module")
def m(postfix, tmp_path_factory):
    mm = PolicyMaild(tmp_path_factory.mktemp("forged"), enforcing(postfix.reinject_port))
    mm.start()
    yield mm
    mm.stop()


def subject() -> str:
    return f"figures {uuid.uuid4().hex[:12]}"


def outside_with(postfix: Postfix, needle: str) -> list[bytes]:
    return [x for x in postfix.outside_messages() if needle.encode() in x]


def wait_outside_with(postfix: Postfix, needle: str, timeout: float = 20) -> bytes:
    """The delivered outside message containing needle, once Postfix has delivered it."""
    timeout = patience(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = outside_with(postfix, needle)
        if got:
            return got[0]
        time.sleep(0.1)
    raise AssertionError(f"no outside message with {needle!r}:\n{postfix.log_tail()}")


def send_as_acme(
    port: int,
    *,
    frm: str = "boss@acme.example",
    helo: str = HELO,
    header: list[str] = (),
    to: str = "partner@outside.example",
    **kw,
):
    return swaks(port, frm=frm, to=to, bind=CUSTOMER_IP, helo=helo, header=list(header), **kw)


def test_forged_from_is_refused_with_the_named_rule_and_a_strike(postfix, m):
    subj = subject()
    r = send_as_acme(
        m.port, header=["From: Chief Executive <ceo@bank.example>", f"Subject: {subj}"]
    )
    assert r.rcpt_codes == [250], r.output
    assert r.data_code == 550, r.output
    assert "5.7.1 From: address <ceo@bank.example> is not an address of yours" in r.data_reply
    assert "(from-owner)" in r.data_reply
    log = m.wait_log("rule=from-owner")
    assert re.search(
        r"reject: DATA from \S+\[127\.0\.0\.9\]: 550 5\.7\.1 .*customer=acme by=network "
        r"from=<boss@acme\.example> .*rule=from-owner",
        log,
    ), log[-2000:]
    m.wait_log("action=strike rule=from-owner")
    postfix.wait_queue_empty()
    assert outside_with(postfix, subj) == []


def test_the_same_message_with_a_permitted_entry_passes(postfix, m):
    subj = subject()
    forged = ["From: Chief Executive <ceo@bank.example>", f"Subject: {subj}"]
    assert send_as_acme(m.port, header=forged).data_code == 550
    m.extra = GRANT
    m.write()
    m.signal(signal.SIGHUP)
    m.wait_log("reload: policy reloaded")
    try:
        r = send_as_acme(m.port, header=forged)
        assert r.data_code == 250, r.output
        msg = wait_outside_with(postfix, subj)
        assert b"From: Chief Executive <ceo@bank.example>" in msg
        log = m.wait_log("field=from address=<ceo@bank.example>")
        assert "permitted by M. Banker, bank.example legal, letter of 2024-05-02" in log
        # the permission covers From: only, not the envelope
        r = send_as_acme(m.port, frm="ceo@bank.example", header=forged)
        assert r.rcpt_codes == [553] and "5.7.1" in r.output, r.output
    finally:
        m.extra = ""
        m.write()
        m.signal(signal.SIGHUP)


def test_forged_envelope_is_refused_at_rcpt_but_postmaster_still_gets_it(postfix, m):
    s = smtp(m.port, source=CUSTOMER_IP, helo=HELO)
    s.mail("ceo@bank.example")
    code, text = s.rcpt("partner@outside.example")
    assert (code, text[:5]) == (553, b"5.7.1"), text
    assert b"<ceo@bank.example> is not an address of yours" in text
    s.rset()
    s.mail("ceo@bank.example")
    assert s.rcpt("postmaster@hosted.example")[0] == 250
    code, _ = s.data(b"From: ceo@bank.example\r\nSubject: complaint\r\n\r\nabout spam\r\n")
    assert code == 250
    s.quit()
    postfix.wait_for_messages("postmaster@hosted.example", 1)
    m.wait_log("rule=envelope-owner")


def test_a_registered_lists_return_path_on_a_hosted_domain_is_its_customers(postfix, m):
    """`optin list register --return-path 'news-bounces+*@hosted.example'` (the pattern of
    the shipped policies.toml, on the provider's domain): list mail from that return path,
    with its unsubscribe address in Reply-To:, passes every ownership check for the list's
    customer and costs no strike; for another customer it is still a forgery."""
    r = m.cli(
        "optin",
        "list",
        "register",
        "news.newsco.example",
        "--customer",
        "newsco",
        "--owner",
        "news-owner@newsco.example",
        "--domain",
        "hosted.example",
        "--return-path",
        "news-bounces+*@hosted.example",
        "--unsubscribe",
        "news-leave@hosted.example",
        "--consent-text",
        "Newsco News: one message a month.",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    sub = "reader@hosted.example"
    r = m.cli(
        "optin",
        "add",
        "news.newsco.example",
        sub,
        "--source",
        "signup form",
        "--obtained",
        "2024-01-15",
    )
    assert r.returncode == 0, r.stdout + r.stderr

    def daemon_knows_the_list() -> bool:  # hosted.example became a list domain: a made-up
        s = smtp(m.port)  # confirm+TOKEN@ is refused at RCPT (no strike)
        try:
            s.mail("someone@outside.example")
            return s.rcpt(f"confirm+{'a' * 32}@hosted.example")[0] == 550
        finally:
            s.close()

    assert wait_until(daemon_knows_the_list)
    rp = "news-bounces+reader=hosted.example@hosted.example"
    subj = subject()
    head = [
        f"From: Newsco News <{rp}>",
        f"To: {sub}",
        "Reply-To: news-leave@hosted.example",
        "List-Id: <news.newsco.example>",
        "List-Unsubscribe: <mailto:news-leave@hosted.example>",
        f"Subject: {subj}",
    ]
    r = swaks(m.port, frm=rp, to=sub, bind=NEWSCO, helo="mail.newsco.example", header=head)
    assert r.rcpt_codes == [250] and r.data_code == 250, r.output
    assert any(subj.encode() in x for x in postfix.wait_for_messages(sub, 1))
    log = m.wait_log(f"from=<{rp}>")
    assert "sanction: customer=newsco" not in log
    assert not re.search(r"customer=newsco .*rule=\S+-owner", log), log[-2000:]
    # the same return path is not another customer's
    r = swaks(m.port, frm=rp, to=sub, bind=OTHERCO, helo="mail.otherco.example", header=head)
    assert r.rcpt_codes == [553], r.output
    assert f"5.7.1 Sender address <{rp}> is not an address of yours" in r.output
    m.wait_log("sanction: customer=otherco action=strike rule=envelope-owner")


def test_sender_domain_nxdomain_is_550_and_dns_timeout_is_451(postfix, m):
    r = send_as_acme(m.port, frm="boss@nxdomain.acme.example")
    assert r.rcpt_codes == [550] and "5.1.8" in r.output and "does not exist in DNS" in r.output, (
        r.output
    )
    r = send_as_acme(m.port, frm="boss@timeout.acme.example")
    assert r.rcpt_codes == [451] and "4.4.3" in r.output, r.output
    assert "try again later" in r.output
    log = m.wait_log("dns: warning: MX lookup for timeout.acme.example failed: timeout after 1s")
    assert re.search(r"tempfail: RCPT from \S+: 451 4\.4\.3 .*rule=sender-domain-unknown", log)


def test_helo_claiming_our_host_name_is_refused(m):
    r = send_as_acme(m.port, helo="mx.hosted.example")
    assert r.rcpt_codes == [550], r.output
    assert "5.7.1 HELO mx.hosted.example is our own host name" in r.output
    r = send_as_acme(m.port, helo="vm")
    assert r.rcpt_codes == [550] and "5.5.2" in r.output and "not a fully qualified" in r.output


def test_display_name_spoof_and_structure_are_refused(m):
    r = send_as_acme(m.port, header=['From: "security@bank.example" <boss@acme.example>'])
    assert r.data_code == 550 and "(display-name-spoof)" in r.data_reply, r.output
    r = send_as_acme(m.port, header=["Date: next Tuesday"])
    assert r.data_code == 550 and "5.6.0" in r.data_reply and "(date-invalid)" in r.data_reply


def test_null_sender_only_for_bounces(postfix, m):
    subj = subject()
    bounce = (
        f"From: MAILER-DAEMON@mail.acme.example\r\nTo: partner@outside.example\r\n"
        f"Subject: Undelivered Mail Returned to Sender {subj}\r\nDate: {_now()}\r\n"
        "Message-ID: <b@mail.acme.example>\r\nAuto-Submitted: auto-replied\r\n"
        "\r\nnot delivered\r\n"
    )
    s = smtp(m.port, source=CUSTOMER_IP, helo=HELO)
    s.mail("<>")
    assert s.rcpt("partner@outside.example")[0] == 250
    code, text = s.data(bounce.encode())
    assert code == 250, text
    s.mail("<>")
    assert s.rcpt("partner@outside.example")[0] == 250
    code, text = s.data(
        f"From: boss@acme.example\r\nSubject: offers\r\nDate: {_now()}\r\n"
        "Message-ID: <n@acme.example>\r\n\r\nbuy\r\n".encode()
    )
    assert (code, text[:5]) == (550, b"5.7.1") and b"(null-sender)" in text, text
    s.quit()
    postfix.wait_queue_empty()
    assert len(outside_with(postfix, subj)) == 1


def test_inbound_mail_from_strangers_is_not_judged_for_ownership(postfix, m):
    subj = subject()
    r = swaks(
        m.port,
        frm="ceo@bank.example",
        to="bob@hosted.example",
        bind=STRANGER,
        helo="vm",
        header=["From: CEO <ceo@bank.example>", f"Subject: {subj}"],
    )
    assert r.data_code == 250, r.output
    msgs = [x for x in postfix.wait_for_messages("bob@hosted.example", 1) if subj.encode() in x]
    assert msgs and b"X-Maild-Verdict" not in msgs[0]


def test_tag_mode_adds_the_verdict_and_delivers_and_outside_maild_headers_are_replaced(
    postfix, tmp_path
):
    with Maild(tmp_path / "tag", front_policy(postfix.reinject_port)) as mt:  # mode = "tag"
        subj = subject()
        r = send_as_acme(
            mt.port,
            header=[
                "From: CEO <ceo@bank.example>",
                f"Subject: {subj}",
                "X-Maild-Customer: bank (by login ceo)",
                "X-Maild-Verdict: rule=all result=pass",
            ],
        )
        assert r.data_code == 250, r.output
        msg = wait_outside_with(postfix, subj)
        head = msg.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
        customers = re.findall(rb"^X-Maild-Customer: (.*)$", head, re.M)
        assert [c.strip() for c in customers] == [b"acme (by network)"]
        verdicts = re.findall(rb"^X-Maild-Verdict: (.*(?:\r?\n\s.*)*)", head, re.M)
        assert len(verdicts) == 1, head
        v = b" ".join(verdicts[0].split())
        assert v.startswith(
            b"rule=from-owner result=fail enforce=reject; From: address "
            b"<ceo@bank.example> is not an address of yours"
        ), v
        mt.wait_log("tag: DATA from")
        assert "rule=from-owner" in mt.log()


def test_before_queue_login_is_judged_at_end_of_data(tmp_path):
    """The SASL login reaches maild in Postfix's Received line at end of data: the
    envelope and header checks run then, under the customer; a mail program's HELO is
    not judged, and Postfix's own Received line is not taken for a forgery."""
    need("postfix", "swaks", "dovecot")
    port = free_port()
    pf = Postfix(
        tmp_path / "pf",
        hosted_domains=HOSTED,
        hostname="host.hosted.example",
        proxy_filter=f"127.0.0.1:{port}",
        proxy_timeout="100s",
        sasl_users={"alice": "secret"},
        main_cf={"smtpd_sasl_authenticated_header": "yes"},
    )
    policy = enforcing(pf.reinject_port)
    policy["server"].update(mode="before-queue")
    with Maild(tmp_path / "m", policy, port=port) as mb:
        pf.start()
        try:
            subj = subject()
            r = swaks(
                pf.smtpd_port,
                frm="alice@acme.example",
                to="partner@elsewhere.example",
                bind="127.0.0.77",
                helo="DESKTOP-7QX",
                auth=("alice", "secret"),
                header=[f"Subject: {subj}"],
            )
            assert r.data_code == 250, r.output
            r = swaks(
                pf.smtpd_port,
                frm="alice@acme.example",
                to="partner@elsewhere.example",
                bind="127.0.0.77",
                helo="DESKTOP-7QX",
                auth=("alice", "secret"),
                header=["From: CEO <ceo@bank.example>"],
            )
            assert r.data_code == 550 and "(from-owner)" in (r.data_reply or ""), r.output
            r = swaks(
                pf.smtpd_port,
                frm="ceo@bank.example",
                to="partner@elsewhere.example",
                bind="127.0.0.77",
                helo="DESKTOP-7QX",
                auth=("alice", "secret"),
            )
            assert r.rcpt_codes == [250], r.output  # a stranger until the login is known
            assert r.data_code == 553 and "(envelope-owner)" in (r.data_reply or ""), r.output
            pf.wait_queue_empty()
            assert len(outside_with(pf, subj)) == 1
            log = mb.wait_log("rule=envelope-owner")
            assert re.search(
                r"reject: DATA from \S+: 550 5\.7\.1 .*customer=acme by=login .*"
                r"rule=from-owner",
                log,
            ), log[-2000:]
        finally:
            pf.stop()


def _now() -> str:
    from email.utils import format_datetime, localtime

    return format_datetime(localtime())
