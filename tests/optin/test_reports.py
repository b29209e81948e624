"""ARF complaints (RFC 5965) and DSN bounces (RFC 3464) parsed from real-shaped reports."""

from __future__ import annotations

from maild.optin.reports import address_failure, parse_arf, parse_dsn

ARF = """\
From: fbl@isp.example
To: abuse@hosted.example
Subject: FW: spam
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="b"

--b
Content-Type: text/plain

This is an email abuse report.
--b
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeFBL/2.1
Version: 1
Original-Mail-From: <news-bounces+bob=example.org@lists.hosted.example>
Original-Rcpt-To: <bob@example.org>
Source-IP: 192.0.2.9
Arrival-Date: Thu, 8 Mar 2024 14:00:00 +0000

--b
Content-Type: {third}

Return-Path: <news-bounces+bob=example.org@lists.hosted.example>
From: news@acme.example
To: Bob <bob@example.org>
List-Id: Acme News <news.acme.example>
Message-ID: <n-1@acme.example>
Subject: news

{body}--b--
"""


def arf(third: str = "message/rfc822", body: str = "The news.\n") -> bytes:
    return ARF.format(third=third, body=body).replace("\n", "\r\n").encode()


def test_arf_with_the_original_message():
    c = parse_arf(arf())
    assert c is not None and c.feedback_type == "abuse" and c.reporter == "SomeFBL/2.1"
    assert c.mail_from == "news-bounces+bob=example.org@lists.hosted.example"
    assert c.rcpt_to == ["bob@example.org"] and c.to == ["bob@example.org"]
    assert c.list_id == "news.acme.example" and c.message_id == "<n-1@acme.example>"
    assert c.source_ip == "192.0.2.9"


def test_arf_with_headers_only_and_a_redacted_recipient():
    raw = arf(third="text/rfc822-headers", body="").replace(
        b"Original-Rcpt-To: <bob@example.org>", b"Original-Rcpt-To: <redacted@isp.example>"
    )
    c = parse_arf(raw)
    assert (
        c is not None and c.list_id == "news.acme.example" and c.rcpt_to == ["redacted@isp.example"]
    )
    assert c.to == ["bob@example.org"]


def test_not_an_arf():
    assert parse_arf(b"From: a@b\r\nSubject: hi\r\n\r\nplain complaint\r\n") is None
    assert (
        parse_arf(arf().replace(b"report-type=feedback-report", b"report-type=delivery-status"))
        is None
    )


DSN = """\
From: MAILER-DAEMON@mx.example.org
To: news-bounces+bob=example.org@lists.hosted.example
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="d"

--d
Content-Type: text/plain

I'm sorry to have to inform you...
--d
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org

Final-Recipient: rfc822; bob@example.org
Original-Recipient: rfc822;bob@example.org
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <bob@example.org>: Recipient address rejected

Final-Recipient: rfc822; carol@example.org
Action: failed
Status: 5.7.1
Diagnostic-Code: smtp; 554 5.7.1 blocked as spam

Final-Recipient: rfc822; dan@example.org
Action: delayed
Status: 4.4.1

--d--
"""


def test_dsn_permanent_failures():
    got = parse_dsn(DSN.replace("\n", "\r\n").encode())
    assert [(b.recipient, b.status) for b in got] == [
        ("bob@example.org", "5.1.1"),
        ("carol@example.org", "5.7.1"),
    ]
    assert "Recipient address rejected" in got[0].diagnostic
    assert address_failure("5.1.1") and address_failure("5.2.1")
    assert not address_failure("5.7.1") and not address_failure("5.2.2")
