"""Front mode against a real Postfix: delivery, the Received line, refusals passed back."""

from __future__ import annotations

import re
import time

from tests.harness.clients import swaks
from tests.harness.maild import Maild
from tests.harness.postfix import Postfix
from tests.integration.conftest import CUSTOMER_IP, HOSTED, STRANGER, front_policy, smtp


def test_message_is_delivered_with_maild_received_line_and_queue_id(postfix, maild):
    r = swaks(
        maild.port,
        frm="someone@outside.example",
        to="bob@hosted.example",
        bind=STRANGER,
        header=["Subject: hello bob"],
    )
    assert r.data_code == 250, r.output
    assert re.search(r"queued as [0-9A-F]+", r.output), "downstream queue id not passed back"
    msg = postfix.wait_for_messages("bob@hosted.example", 1)[-1]
    assert b"Subject: hello bob" in msg
    received = re.search(
        rb"Received: from \S+ \(unknown \[127\.0\.0\.5\]\)\r?\n\tby mx\.hosted\.example"
        rb" \(maild\) with ESMTP id ([0-9A-F]{10})",
        msg,
    )
    assert received, msg[:800]
    # the same id is in maild's log line for this message
    maild.wait_log(f"{received.group(1).decode()}: relay: DATA from unknown[127.0.0.5]")


def test_customer_network_relays_to_outside(postfix, maild):
    before = len(postfix.outside_messages())
    r = swaks(maild.port, frm="boss@acme.example", to="partner@outside.example", bind=CUSTOMER_IP)
    assert r.data_code == 250, r.output
    postfix.wait_for_outside(before + 1)
    assert "customer=acme by=network" in maild.wait_log("to=<partner@outside.example> size=")


def test_downstream_refusal_is_per_recipient(tmp_path):
    pf = Postfix(
        tmp_path / "pf",
        hosted_domains=HOSTED,
        reinject_options={
            "smtpd_recipient_restrictions": "check_recipient_access,inline:{nobody@hosted.example=REJECT},permit_mynetworks,reject"
        },
    )
    with pf, Maild(tmp_path / "m", front_policy(pf.reinject_port)) as m:
        s = smtp(m.port)
        s.mail("a@outside.example")
        assert s.rcpt("bob@hosted.example")[0] == 250
        code, text = s.rcpt("nobody@hosted.example")
        assert code == 554 and b"Recipient address rejected" in text, text
        code, text = s.data(b"Subject: t\r\n\r\nbody\r\n")
        assert code == 250 and b"queued as" in text
        s.quit()
        pf.wait_for_messages("bob@hosted.example", 1)
        pf.wait_queue_empty()
        assert pf.messages("nobody@hosted.example") == []
        m.wait_log("reject: RCPT from unknown[127.0.0.5]: 554 5.7.1 <nobody@hosted.example>")


def test_downstream_5xx_at_end_of_data_reaches_the_client(tmp_path):
    pf = Postfix(
        tmp_path / "pf", hosted_domains=HOSTED, reinject_options={"message_size_limit": "4000"}
    )
    with pf, Maild(tmp_path / "m", front_policy(pf.reinject_port)) as m:
        s = smtp(m.port)
        s.mail("a@outside.example")
        s.rcpt("bob@hosted.example")
        code, text = s.data(b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 100)
        assert code == 552 and b"5.3.4" in text, (code, text)
        # the session and the pooled downstream connection stay usable
        s.mail("a@outside.example")
        s.rcpt("bob@hosted.example")
        assert s.data(b"Subject: small\r\n\r\nok\r\n")[0] == 250
        s.quit()
        msgs = pf.wait_for_messages("bob@hosted.example", 1)
        assert len(msgs) == 1 and b"Subject: small" in msgs[0]


def test_postfix_down_gives_4xx_and_nothing_is_lost(tmp_path):
    pf = Postfix(tmp_path / "pf", hosted_domains=HOSTED)
    pf.start()
    with Maild(tmp_path / "m", front_policy(pf.reinject_port)) as m:
        assert (
            swaks(m.port, frm="a@outside.example", to="bob@hosted.example", bind=STRANGER).data_code
            == 250
        )
        pf.stop()
        r = swaks(
            m.port,
            frm="a@outside.example",
            to="bob@hosted.example",
            bind=STRANGER,
            header=["Subject: while down"],
        )
        # no downstream connection before a recipient: the failure shows at the first RCPT
        assert r.data_code is None and "451 4.4.1" in r.output, r.output
        m.wait_log("tempfail: RCPT from unknown[127.0.0.5]: 451 4.4.1")
        # the client retries once Postfix is back: delivered exactly once
        pf.start()
        r = swaks(
            m.port,
            frm="a@outside.example",
            to="bob@hosted.example",
            bind=STRANGER,
            header=["Subject: while down"],
        )
        assert r.data_code == 250, r.output
        msgs = pf.wait_for_messages("bob@hosted.example", 2)
        time.sleep(0.5)
        msgs = pf.messages("bob@hosted.example")
        assert sum(b"Subject: while down" in x for x in msgs) == 1
    pf.stop()


def test_downstream_connections_are_reused(tmp_path):
    pf = Postfix(tmp_path / "pf", hosted_domains=HOSTED)
    with pf, Maild(tmp_path / "m", front_policy(pf.reinject_port)) as m:
        for _i in range(5):
            r = swaks(m.port, frm="a@outside.example", to="bob@hosted.example", bind=STRANGER)
            assert r.data_code == 250, r.output
        pf.wait_for_messages("bob@hosted.example", 5)
        connects = re.findall(r"postfix/reinject/smtpd\[\d+\]: connect from", pf.log())
        assert 1 <= len(connects) < 5, connects


def test_untrusted_xforward_is_refused(maild):
    s = smtp(maild.port)
    assert "XFORWARD" not in s.ehlo_resp.decode()
    code, text = s.docmd("XFORWARD", "ADDR=203.0.113.9")
    assert (code, text[:5]) == (550, b"5.7.0")
    s.quit()
    maild.wait_log("reject: XFORWARD from unknown[127.0.0.5]: 550 5.7.0")


def test_trusted_xforward_defines_the_client_and_is_passed_downstream(postfix, maild):
    s = smtp(maild.port, source="127.0.0.1")
    assert "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE" in s.ehlo_resp.decode()
    assert (
        s.docmd("XFORWARD", "NAME=relay.client.example ADDR=203.0.113.9 PORT=4711 HELO=c.example")[
            0
        ]
        == 250
    )
    assert s.docmd("XFORWARD", "PROTO=ESMTP SOURCE=REMOTE")[0] == 250
    s.mail("x@outside.example")
    assert s.rcpt("carol@hosted.example")[0] == 250
    code, _ = s.data(b"Subject: via xforward\r\n\r\nbody\r\n")
    assert code == 250
    # XFORWARD inside a transaction is a protocol error
    s.mail("x@outside.example")
    assert s.docmd("XFORWARD", "ADDR=198.51.100.1")[0] == 503
    s.quit()
    msg = postfix.wait_for_messages("carol@hosted.example", 1)[-1]
    assert b"Received: from c.example (relay.client.example [203.0.113.9])" in msg
    postfix.wait_for_log(r"client=relay\.client\.example\[203\.0\.113\.9\]")


# Lines that dot-stuffing must get right on both hops: client -> maild (DATA) and maild ->
# downstream (BDAT where the downstream offers CHUNKING, as Postfix does; DATA with
# dot-stuffing where it does not, as smtp-sink).
DOTTED = b"Subject: dots\r\n\r\n.\r\n..\r\n...\r\n.leading\r\nmiddle . line\r\n. space\r\nlast\r\n"


def test_dotted_lines_arrive_intact_through_postfix(postfix, maild):
    with smtp(maild.port) as s:
        s.sendmail("dots@outside.example", ["dots@hosted.example"], DOTTED)
    msg = postfix.wait_for_messages("dots@hosted.example", 1)[-1].replace(b"\r\n", b"\n")
    assert msg.endswith(DOTTED.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")), msg[-200:]


def test_dotted_lines_arrive_intact_through_a_downstream_without_chunking(
    smtp_sink_factory, tmp_path
):
    sink = smtp_sink_factory()
    with Maild(tmp_path / "m", front_policy(sink.port)) as m, smtp(m.port) as s:
        s.sendmail("dots@outside.example", ["dots@hosted.example"], DOTTED)
    body = sink.wait_for_messages(1)[-1].data
    assert body.endswith(DOTTED.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")), body[-200:]
