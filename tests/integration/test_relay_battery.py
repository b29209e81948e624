"""The open-relay battery (nmap smtp-open-relay, ANCHORS.md section 2) from a stranger.

Every case must be refused at RCPT, and nothing may reach Postfix's outside catch-all.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import smtp

D, S, IP = "outside.example", "host.hosted.example", "[127.0.0.1]"

SENDERS = ["<>", f"<antispam@{D}>", f"<antispam@{S}>", f"<antispam@{IP}>"]
RECIPIENTS = [
    f"<relaytest@{D}>",
    f"<relaytest%{D}@{IP}>",
    f"<relaytest%{D}@{S}>",
    f'<"relaytest@{D}">',
    f'<"relaytest%{D}">',
    f"<relaytest@{D}@{IP}>",
    f'<"relaytest@{D}"@{IP}>',
    f"<relaytest@{D}@{S}>",
    f"<@{IP}:relaytest@{D}>",
    f"<@{S}:relaytest@{D}>",
    f"<{D}!relaytest>",
    f"<{D}!relaytest@{IP}>",
    f"<{D}!relaytest@{S}>",
    # mixed case and trailing dots
    "<RelayTest@OUTSIDE.Example.>",
    "<relaytest%OUTSIDE.EXAMPLE.@HOST.HOSTED.EXAMPLE.>",
    f"<relaytest@{D}.>",
    "<relaytest@[198.51.100.1]>",
]


@pytest.mark.parametrize("sender", SENDERS)
def test_every_relay_trick_is_refused(postfix, maild, sender):
    before = len(postfix.outside_messages())
    s = smtp(maild.port)
    code, text = s.docmd("MAIL", f"FROM:{sender}")
    assert code == 250, text
    answers = {rcpt: s.docmd("RCPT", f"TO:{rcpt}") for rcpt in RECIPIENTS}
    s.quit()
    accepted = {r: a for r, a in answers.items() if a[0] < 400}
    assert not accepted, f"open relay from {sender}: {accepted}"
    assert all(a[0] >= 500 for a in answers.values()), answers
    assert len(postfix.outside_messages()) == before


def test_hosted_domains_still_accepted_from_strangers(postfix, maild):
    s = smtp(maild.port)
    s.docmd("MAIL", "FROM:<antispam@outside.example>")
    for rcpt in ["<bob@hosted.example>", "<Bob@HOSTED.example.>", "<alice@host.hosted.example>"]:
        assert s.docmd("RCPT", f"TO:{rcpt}")[0] == 250, rcpt
    s.quit()
