"""The confirmation mail asks for a reply (no link) and the stored copy has no token."""

from __future__ import annotations

from maild.optin import messages
from maild.optin.settings import section
from maild.optin.tokens import new_token, token_hash
from maild.smtp.submit import as_bytes
from tests.optin.conftest import CONSENT


def test_confirmation(config):
    lst = section(config).lists[0]
    token = new_token()
    assert len(token) == 32 and token == token.lower()
    msg, mid = messages.confirmation(
        lst,
        "bob@example.org",
        token,
        confirm_local="confirm",
        hostname="mx.hosted.example",
        when="2024-03-01T10:00:00",
        expires="2024-03-04T10:00:00",
        ip="198.51.100.7",
    )
    assert msg["Reply-To"] == f"confirm+{token}@lists.hosted.example"
    assert msg["Message-ID"] == mid and mid.endswith("@mx.hosted.example>")
    assert msg["Auto-Submitted"] == "auto-generated" and msg["To"] == "bob@example.org"
    body = msg.get_content()
    assert "198.51.100.7" in body and "2024-03-04T10:00:00" in body
    assert " ".join(CONSENT.split()) in " ".join(body.split())
    assert "http" not in body  # confirmation is a reply, never a click
    stored = messages.redacted(msg, token)
    assert token.encode() not in stored and token_hash(token)[:32].encode() in stored
    assert token.encode() in as_bytes(msg)


def test_revocation_notice(config):
    lst = section(config).lists[0]
    msg, mid = messages.revocation_notice(
        lst,
        "bob@example.org",
        channel="one-click",
        when="2024-03-01T10:00:00",
        hostname="mx.hosted.example",
    )
    assert msg["Subject"] == "You have been unsubscribed from Acme News"
    assert "one-click unsubscribe" in msg.get_content() and msg["Message-ID"] == mid


def test_token_hash_is_case_insensitive():
    t = new_token()
    assert token_hash(t) == token_hash(t.upper()) != token_hash(new_token())
