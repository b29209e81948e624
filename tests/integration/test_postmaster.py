"""Postmaster acceptance: from anyone, whatever later rules say, relayed and logged."""

from __future__ import annotations

from tests.integration.conftest import smtp


def test_bare_postmaster_upper_postmaster_and_abuse_at_host_name(postfix, maild):
    s = smtp(maild.port)
    for rcpt in ["<Postmaster>", "<POSTMASTER@hosted.example>", "<abuse@host.hosted.example>"]:
        s.docmd("MAIL", "FROM:<complaint@outside.example>")
        code, text = s.docmd("RCPT", f"TO:{rcpt}")
        assert code == 250, (rcpt, text)
        code, text = s.data(f"Subject: to {rcpt}\r\n\r\nhello\r\n".encode())
        assert code == 250, (rcpt, text)
    s.quit()
    postfix.wait_for_messages("postmaster@hosted.example", 1)
    postfix.wait_for_messages("abuse@host.hosted.example", 1)
    # bare <Postmaster> is qualified by Postfix with its own host name
    postfix.wait_for_messages("postmaster@host.hosted.example", 1)
    log = maild.wait_log("to=<abuse@host.hosted.example>")
    assert log.count("rule=postmaster") >= 3


def test_postmaster_from_a_null_sender_and_mixed_transaction_split(postfix, maild):
    s = smtp(maild.port)
    assert s.docmd("MAIL", "FROM:<>")[0] == 250
    assert s.docmd("RCPT", "TO:<postmaster@hosted.example>")[0] == 250
    code, text = s.docmd("RCPT", "TO:<bob@hosted.example>")
    assert (code, text[:5]) == (452, b"4.5.3"), text
    s.quit()
