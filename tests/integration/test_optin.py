"""Opt-in list evidence through maild and a real Postfix, end to end.

Customers here (each its own, so that strikes in one test never block another):
acme 127.0.0.9 (front_policy's), listco 127.0.0.30 (complaints), rogue 127.0.0.31
(unregistered list), newsco 127.0.0.32 (per-message rules). The lists' domain
lists.hosted.example and the subscribers' hosted.example are hosted by the test
Postfix, so confirmation mail, notices and replies land in Maildirs the test reads.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import sqlite3
import zipfile
from pathlib import Path

import pytest

from tests.harness.clients import swaks
from tests.harness.maild import Maild
from tests.harness.postfix import Postfix
from tests.harness.waits import wait_until
from tests.integration.conftest import CUSTOMER_IP, HOSTED, STRANGER, front_policy, need

LISTCO, ROGUE, NEWSCO = "127.0.0.30", "127.0.0.31", "127.0.0.32"
LISTS = "lists.hosted.example"
CONSENT = "Acme News: one message a month about Acme products. Unsubscribe at any time."


def policy(port: int) -> dict:
    p = front_policy(port)
    p["postmaster"]["domains"] = [*p["postmaster"]["domains"], LISTS]
    p["customers"] += [
        {"name": "listco", "networks": [f"{LISTCO}/32"], "contact": "ops-listco@hosted.example"},
        {"name": "rogue", "networks": [f"{ROGUE}/32"], "contact": "ops-rogue@hosted.example"},
        {"name": "newsco", "networks": [f"{NEWSCO}/32"], "contact": "ops-newsco@hosted.example"},
    ]
    p["sanctions"] = {"contact": "abuse@hosted.example"}
    p["optin"] = {
        "complaint_min_volume": 10,
        "lists": [
            {
                "id": "news.acme.example",
                "customer": "acme",
                "owner": "news-owner@acme.example",
                "name": "Acme News",
                "domain": LISTS,
                "return_paths": [f"news-bounces+*@{LISTS}"],
                "unsubscribe": [f"news-leave@{LISTS}", f"news-leave+*@{LISTS}"],
                "consent_text": CONSENT,
            },
            {
                "id": "deals.listco.example",
                "customer": "listco",
                "owner": "deals@listco.example",
                "domain": LISTS,
                "return_paths": [f"deals-bounces+*@{LISTS}"],
                "consent_text": "Weekly deals from Listco.",
            },
            {
                "id": "digest.newsco.example",
                "customer": "newsco",
                "owner": "digest@newsco.example",
                "domain": LISTS,
                "return_paths": [f"digest-bounces@{LISTS}"],
                "consent_text": "The Newsco daily digest.",
            },
        ],
    }
    return p


@pytest.fixture(scope="module")
def postfix(tmp_path_factory):
    need("postfix", "swaks")
    pf = Postfix(
        tmp_path_factory.mktemp("pf-optin"),
        hosted_domains=[*HOSTED, LISTS],
        hostname="host.hosted.example",
    )
    pf.start()
    yield pf
    pf.stop()


@pytest.fixture(scope="module")
def m(postfix, tmp_path_factory):
    md = Maild(tmp_path_factory.mktemp("optin"), policy(postfix.reinject_port))
    md.start()
    try:
        md.wait_log("optin: lists=3", timeout=5)
    except AssertionError:
        md.stop()
        pytest.fail(
            "maild serve did not start the opt-in service: maild/daemon.py must start "
            "maild.optin.service.OptinService and put it in its Services "
            "(maild/policy/services.py; docs/optin.md)"
        )
    yield md
    md.stop()


def status(m: Maild, address: str) -> dict:
    r = m.cli("optin", "status", address, "--json")
    assert r.returncode == 0, r.stderr
    return {x["list_id"]: x for x in json.loads(r.stdout)}


def state(m: Maild, address: str, list_id: str) -> str:
    return status(m, address).get(list_id, {}).get("state", "unknown")


def list_mail(
    m: Maild,
    bind: str,
    sender: str,
    to: str | list[str],
    *,
    list_id: str,
    headers: list[str] | None = None,
    body: str | None = None,
    to_header: str | None = None,
):
    rcpts = [to] if isinstance(to, str) else to
    hdrs = (
        [
            f"To: {to_header or rcpts[0]}",
            f"List-Id: <{list_id}>",
            "Subject: This month",
            f"List-Unsubscribe: <mailto:news-leave@{LISTS}>",
        ]
        if headers is None
        else headers
    )
    return swaks(
        m.port,
        frm=sender,
        to=rcpts,
        bind=bind,
        header=hdrs,
        body=body or "Hello subscriber, here is this month's news.\r\n",
    )


def test_round_trip_request_confirm_deliver_unsubscribe_evidence_tamper(postfix, m, tmp_path):
    bob, carol, dave = "bob@hosted.example", "carol@hosted.example", "dave@hosted.example"
    form = tmp_path / "form.log"
    form.write_text(
        '198.51.100.7 - - [01/Mar/2024:10:00:00 +0000] "POST /subscribe HTTP/1.1" '
        '200 "email=bob%40hosted.example"\n'
    )
    # 1. the customer's web form relays a request: maild sends the confirmation mail
    r = m.cli(
        "optin",
        "request",
        "news.acme.example",
        bob,
        "--ip",
        "198.51.100.7",
        "--user-agent",
        "Mozilla/5.0 (X11)",
        "--evidence",
        str(form),
        "--json",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["sent"] is True
    assert m.cli("optin", "request", "news.acme.example", dave).returncode == 0
    conf = email.message_from_bytes(
        postfix.wait_for_messages(bob, 1)[-1], policy=email.policy.default
    )
    assert conf["Subject"] == "Please confirm your subscription to Acme News"
    reply_to = conf["Reply-To"].addresses[0].addr_spec
    assert re.fullmatch(rf"confirm\+[a-z2-7]{{32}}@{re.escape(LISTS)}", reply_to)
    token = reply_to.split("+", 1)[1].split("@")[0]
    assert CONSENT.split(":")[0] in conf.get_content()
    assert state(m, bob, "news.acme.example") == "pending"

    # 2. before confirming, list mail to bob is refused at RCPT
    r = list_mail(
        m, CUSTOMER_IP, f"news-bounces+bob=hosted.example@{LISTS}", bob, list_id="news.acme.example"
    )
    assert r.rcpt_codes == [550], r.output
    assert "has not confirmed the subscription to list news.acme.example" in r.output

    # 3. an automatic reply to the confirmation is not consent
    r = swaks(
        m.port,
        frm=bob,
        to=reply_to,
        bind=STRANGER,
        header=["Auto-Submitted: auto-replied", "Subject: Out of office"],
    )
    assert r.data_code == 250, r.output
    m.wait_log('reason="automatic reply: Auto-Submitted: auto-replied"')
    assert state(m, bob, "news.acme.example") == "pending"

    # 4. bob replies from his mail client: confirmed, with the reply's headers kept
    r = swaks(
        m.port,
        frm=bob,
        to=reply_to,
        bind=STRANGER,
        header=[
            f"Subject: Re: {conf['Subject']}",
            f"In-Reply-To: {conf['Message-ID']}",
            "User-Agent: Thunderbird/115.0",
        ],
        body="yes please\r\n",
    )
    assert r.data_code == 250, r.output
    assert wait_until(lambda: state(m, bob, "news.acme.example") == "confirmed")
    postfix.wait_for_messages(reply_to, 2)  # maild relays the replies; nothing is lost
    # the token is single-use: a second reply changes nothing; a made-up token is refused
    bogus = f"confirm+{'a' * 32}@{LISTS}"
    r = swaks(m.port, frm=bob, to=bogus, bind=STRANGER)
    assert r.rcpt_codes == [550] and "5.1.1 This confirmation address is not valid" in r.output

    # 5. list mail: delivered to the confirmed subscriber, refused for the others
    r = list_mail(
        m, CUSTOMER_IP, f"news-bounces+bob=hosted.example@{LISTS}", bob, list_id="news.acme.example"
    )
    assert r.data_code == 250, r.output
    got = postfix.wait_for_messages(bob, 2)
    assert b"List-Id: <news.acme.example>" in got[-1]
    for who, why in (
        (carol, "is not a subscriber of list news.acme.example with recorded consent"),
        (dave, "has not confirmed"),
    ):
        r = list_mail(
            m,
            CUSTOMER_IP,
            f"news-bounces+x=hosted.example@{LISTS}",
            who,
            list_id="news.acme.example",
        )
        assert r.rcpt_codes == [550] and "5.7.1" in r.output and why in r.output, r.output
    # recognised by List-Id alone (no registered return path): refused at end of data
    r = list_mail(m, CUSTOMER_IP, "someone@acme.example", carol, list_id="news.acme.example")
    assert r.data_code == 550, r.output
    assert "to recipients without confirmed opt-in: <carol@hosted.example> (unknown)" in r.output

    # 6. bob unsubscribes by mail (List-Unsubscribe mailto): the very next message is refused
    r = swaks(
        m.port,
        frm=bob,
        to=f"news-leave@{LISTS}",
        bind=STRANGER,
        header=["Subject: unsubscribe"],
        body="unsubscribe\r\n",
    )
    assert r.data_code == 250, r.output
    r = list_mail(
        m, CUSTOMER_IP, f"news-bounces+bob=hosted.example@{LISTS}", bob, list_id="news.acme.example"
    )
    assert r.rcpt_codes == [550], r.output
    assert "unsubscribed from list news.acme.example" in r.output
    # ... and bob is told, once
    notices = [
        x
        for x in postfix.wait_for_messages(bob, 3)
        if b"Subject: You have been unsubscribed from Acme News" in x
    ]
    assert len(notices) == 1
    assert wait_until(lambda: state(m, bob, "news.acme.example") == "revoked")
    swaks(m.port, frm=bob, to=f"news-leave@{LISTS}", bind=STRANGER, header=["Subject: unsubscribe"])
    m.wait_log("unsubscribe from a non-subscriber")
    assert sum(b"You have been unsubscribed" in x for x in postfix.messages(bob)) == 1

    # 7. the evidence bundle: every step, with headers, and the chain verified
    out = tmp_path / "evidence"
    r = m.cli("optin", "evidence", bob, "--out", str(out), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert res["verified"] is True
    with zipfile.ZipFile(res["path"]) as z:
        names = z.namelist()
        doc = json.loads(z.read("evidence.json"))
        blobs = {n: z.read(n) for n in names}
    kinds = [e["kind"] for e in doc["events"]]
    assert kinds == ["request", "confirm", "revoke"], kinds
    req, confirm, revoke = doc["events"]
    assert (req["ip"], req["user_agent"], req["channel"]) == (
        "198.51.100.7",
        "Mozilla/5.0 (X11)",
        "web",
    )
    assert blobs[req["raw_file"]] == form.read_bytes()
    assert req["token_hash"] and req["token_hash"] == confirm["token_hash"]
    assert confirm["channel"] == "email" and confirm["ip"] == STRANGER
    assert confirm["detail"]["confirmation_message_id"] == conf["Message-ID"]
    assert confirm["user_agent"] == "Thunderbird/115.0"
    reply_raw = blobs[confirm["raw_file"]]
    assert f"In-Reply-To: {conf['Message-ID']}".encode() in reply_raw and b"Date: " in reply_raw
    assert revoke["channel"] == "mailto" and b"Subject: unsubscribe" in blobs[revoke["raw_file"]]
    assert any(n.endswith("-confirmation-sent.eml") for n in names)
    assert blobs[req["consent_text_file"]].decode().strip() == CONSENT
    assert all(e["row_hash_ok"] and e["chain_ok"] for e in doc["events"])
    assert doc["lists"][0]["state"] == "revoked" and doc["lists"][0]["chain"]["verified"]
    # the token: only as a hash, except inside the subscriber's own reply (kept byte for
    # byte, so that its DKIM signature stays verifiable), where it is already spent
    assert [n for n, data in blobs.items() if token.encode() in data] == [confirm["raw_file"]]
    optin_lines = [x for x in m.log().splitlines() if "optin:" in x]
    assert not any(token in x for x in optin_lines)
    assert any(f"token_hash={confirm['token_hash'][:12]}" in x for x in optin_lines)

    # 8. tampering with a stored event is caught by verify
    assert m.cli("optin", "verify").returncode == 0
    with sqlite3.connect(m.policy["server"]["state"]) as db:
        db.execute(
            "UPDATE optin_events SET ip = '203.0.113.66' WHERE address = ? AND event = 'confirm'",
            (bob,),
        )
    r = m.cli("optin", "verify")
    assert r.returncode == 1, r.stdout
    assert "TAMPERING DETECTED" in r.stdout
    assert re.search(
        r"list=news\.acme\.example seq=\d+: confirm event for bob@hosted\.example "
        r"was altered",
        r.stdout,
    ), r.stdout
    r = m.cli("optin", "evidence", bob, "--out", str(out), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["verified"] is False


def test_token_is_never_logged_before_use(postfix, m):
    r = m.cli("optin", "request", "news.acme.example", "frank@hosted.example", "--json")
    assert r.returncode == 0, r.stderr
    conf = email.message_from_bytes(
        postfix.wait_for_messages("frank@hosted.example", 1)[-1], policy=email.policy.default
    )
    token = conf["Reply-To"].addresses[0].addr_spec.split("+", 1)[1].split("@")[0]
    assert token not in m.log()
    assert token.encode() not in Path(m.policy["server"]["state"]).read_bytes()


ARF = """\
From: feedback@isp.example
To: abuse@hosted.example
Subject: Complaint about message from 127.0.0.30
Message-ID: <arf-1@isp.example>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="arf"

--arf
Content-Type: text/plain

This is an email abuse report for an email message received from IP 127.0.0.30.
--arf
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: ExampleFBL/1.0
Version: 1
Original-Mail-From: <deals-bounces+eve=hosted.example@lists.hosted.example>
Original-Rcpt-To: <redacted@isp.example>
Source-IP: 127.0.0.30

--arf
Content-Type: text/rfc822-headers

From: deals@listco.example
To: eve@hosted.example
List-Id: <deals.listco.example>
Subject: Deals
Message-ID: <deal-1@listco.example>

--arf--
"""


def test_arf_report_to_abuse_revokes_the_recipient_and_strikes(postfix, m, tmp_path):
    eve = "eve@hosted.example"
    r = m.cli(
        "optin",
        "add",
        "deals.listco.example",
        eve,
        "--source",
        "shop checkout, double opt-in",
        "--obtained",
        "2024-02-01",
    )
    assert r.returncode == 0, r.stderr
    assert wait_until(
        lambda: (
            list_mail(
                m,
                LISTCO,
                f"deals-bounces+eve=hosted.example@{LISTS}",
                eve,
                list_id="deals.listco.example",
            ).data_code
            == 250
        )
    )
    r = swaks(
        m.port,
        frm="feedback@isp.example",
        to="abuse@hosted.example",
        bind=STRANGER,
        data=ARF.replace("\n", "\r\n"),
    )
    assert r.data_code == 250, r.output
    r = list_mail(
        m, LISTCO, f"deals-bounces+eve=hosted.example@{LISTS}", eve, list_id="deals.listco.example"
    )
    assert r.rcpt_codes == [550], r.output
    assert "is suppressed on list deals.listco.example" in r.output and "spam complaint" in r.output
    assert wait_until(lambda: state(m, eve, "deals.listco.example") == "suppressed")
    m.wait_log("rule=optin-complaints")  # 1 complaint for 1 delivered (floor 10): over 0.3%
    ev = status(m, eve)["deals.listco.example"]["events"]
    assert [e["event"] for e in ev] == ["owner-add", "complaint"]
    # the owner cannot put her back: only her own confirmation could
    r = m.cli(
        "optin", "add", "deals.listco.example", eve, "--source", "x", "--obtained", "2024-02-01"
    )
    assert r.returncode == 1 and "an owner cannot re-add someone who left" in r.stderr


def test_unregistered_list_is_refused_with_a_strike(m):
    r = list_mail(
        m, ROGUE, "promo@rogue.example", "x1@outside.example", list_id="promo.rogue.example"
    )
    assert r.data_code == 550, r.output
    assert (
        "550 5.7.1 Unregistered mailing list" in r.output
        and "List-Id <promo.rogue.example>" in r.output
    )
    r = swaks(
        m.port,
        frm="promo@rogue.example",
        to="x2@outside.example",
        bind=ROGUE,
        header=["Precedence: bulk", "Subject: offer"],
    )
    assert r.data_code == 550 and "Precedence: bulk" in r.output, r.output
    m.wait_log("rule=optin-unregistered")
    # ordinary mail from the same customer still flows
    assert (
        swaks(m.port, frm="me@rogue.example", to="x3@outside.example", bind=ROGUE).data_code == 250
    )


def test_per_message_rules(m):
    a, b = "gina@hosted.example", "hank@hosted.example"
    for x in (a, b):
        r = m.cli(
            "optin",
            "add",
            "digest.newsco.example",
            x,
            "--source",
            "signup form",
            "--obtained",
            "2024-01-15",
        )
        assert r.returncode == 0, r.stderr
    rp = f"digest-bounces@{LISTS}"
    base = ["List-Id: <digest.newsco.example>", "Subject: digest"]
    for x in (a, b):  # the CLI's changes reach the daemon within 2 seconds
        assert wait_until(
            lambda x=x: (
                list_mail(
                    m,
                    NEWSCO,
                    rp,
                    x,
                    list_id="digest.newsco.example",
                    headers=[f"To: {x}", *base, "List-Unsubscribe: <mailto:leave@newsco.example>"],
                ).data_code
                == 250
            )
        )
    r = list_mail(m, NEWSCO, rp, a, list_id="x", headers=[f"To: {a}", *base])
    assert r.data_code == 550 and "must carry a List-Unsubscribe header" in r.output, r.output
    r = list_mail(
        m,
        NEWSCO,
        rp,
        a,
        list_id="x",
        headers=[f"To: {a}", *base, "List-Unsubscribe: <https://newsco.example/u/1>"],
    )
    assert r.data_code == 550 and "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in r.output
    r = list_mail(
        m,
        NEWSCO,
        rp,
        a,
        list_id="x",
        headers=[
            f"To: {a}",
            *base,
            "List-Unsubscribe: <https://newsco.example/u/1>",
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        ],
    )
    assert r.data_code == 250, r.output
    r = list_mail(
        m,
        NEWSCO,
        rp,
        [a, b],
        list_id="x",
        headers=[
            "To: digest@newsco.example",
            *base,
            "List-Unsubscribe: <mailto:leave@newsco.example>",
        ],
    )
    assert r.data_code == 550 and "Bcc-style" in r.output, r.output
    r = list_mail(
        m,
        NEWSCO,
        rp,
        a,
        list_id="x",
        headers=[
            "To: digest@newsco.example",
            *base,
            "List-Unsubscribe: <mailto:leave@newsco.example>",
        ],
        body=f"This copy is for {a}.\r\n",
    )
    assert r.data_code == 250, r.output  # the address in the body is enough
    # mail to postmaster is never judged
    r = swaks(m.port, frm=rp, to="postmaster@hosted.example", bind=NEWSCO, header=base)
    assert r.data_code == 250, r.output
