"""Open-relay fuzzing with the real oracle: whatever recipient path a stranger sends
through maild, Postfix must never route a message to a non-hosted domain.

maild's relay decision (maild.address) is the only guard: the re-injection smtpd behind
it permits everything from maild's address (permit_mynetworks), and it applies the percent
hack, source routes, bang paths and quoted local parts as Postfix does. The property is
checked on what Postfix *did*: every Maildir of the non-hosted catch-all must stay empty.
A control test sends one of the same paths (a source route through a hosted domain)
straight to the re-injection smtpd and sees it leave, so this test can fail.
"""

from __future__ import annotations

import smtplib

from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.budget import budget
from tests.fuzz.strategies import any_path, hidden_hop_path, to_bytes
from tests.integration.conftest import HOSTED, STRANGER, front_policy
from tests.reliability.helpers import settle

SENDER = "fuzz-sender@hosted.example"  # bounces stay in a hosted Maildir


def relay_attempt(port: int, path: str, source: str = STRANGER) -> tuple[int, int | None]:
    """RCPT TO:<path> byte-exact; DATA if accepted. (RCPT code, final code or None)."""
    s = smtplib.SMTP(
        "127.0.0.1", port, local_hostname="client.example", timeout=30, source_address=(source, 0)
    )
    try:
        s.ehlo("client.example")
        code, _ = s.mail(SENDER)
        assert code == 250
        raw = to_bytes(path).replace(b"\r", b"").replace(b"\n", b"")
        s.send(b"RCPT TO:" + raw + b"\r\n")
        code, _ = s.getreply()
        final = None
        if code < 400:
            final, _ = s.data(b"Subject: relay fuzz\r\nX-Path: " + raw[:200] + b"\r\n\r\nx\r\n")
        return code, final
    except smtplib.SMTPServerDisconnected:
        return -1, None
    finally:
        s.close()


def leaked(pf) -> list[bytes]:
    """What Postfix tried to send off the hosted domains (catch-all Maildir)."""
    return [m[:600] for m in pf.outside_messages() if b"relay fuzz" in m]


def test_control_the_oracle_sees_a_relay(postfix_factory):
    """Straight to the re-injection smtpd (no maild), a source route through a hosted
    domain relays: Postfix strips the route and sends to the final, foreign domain."""
    pf = postfix_factory(hosted_domains=HOSTED)
    code, final = relay_attempt(
        pf.reinject_port, "<@hosted.example:victim@outside.example>", source="127.0.0.1"
    )
    assert code == 250 and final == 250
    settle(pf)
    assert len(leaked(pf)) == 1


def test_no_recipient_path_relays_through_maild(postfix_factory, maild_factory):
    # Postfix qualifies a bare <postmaster> (accepted by RFC 5321) with $myorigin: it must be
    # one of ours, as in any real installation.
    pf = postfix_factory(hosted_domains=HOSTED, hostname="host.hosted.example")
    m = maild_factory(front_policy(pf.reinject_port))
    accepted: list[str] = []

    @budget(150)
    @given(st.one_of(hidden_hop_path().map(lambda c: c[0]), any_path()))
    @example("<victim%outside.example@hosted.example>")
    @example("<@hosted.example:victim@outside.example>")
    @example('<"victim@outside.example"@hosted.example>')
    @example("<outside.example!victim@hosted.example>")
    @example("<victim@outside.example@hosted.example>")
    @example("<victim%outside.example%hosted.example@hosted.example>")
    @example("<victim@[127.0.0.1]>")
    @example("<victim%[192.0.2.1]@hosted.example>")
    @example("<Postmaster%outside.example@hosted.example>")
    @example("<postmaster@outside.example>")
    def one(path: str) -> None:
        code, final = relay_attempt(m.port, path)
        if code == 250 and final == 250:
            accepted.append(path)

    one()
    settle(pf, timeout=60)
    assert leaked(pf) == [], f"maild let these through ({len(accepted)} accepted in all)"
    assert m.proc.poll() is None
