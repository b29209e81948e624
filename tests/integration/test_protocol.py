"""What maild's SMTP dialogue offers and refuses, checked against a real Postfix.

SMTPUTF8 (RFC 6531): a non-ASCII path needs the transaction's SMTPUTF8, and then valid
UTF-8. The EHLO keywords, HELP and the commands maild does not have, answered as the
Postfix behind it answers them (its public smtpd: no SASL, no TLS).
"""

from __future__ import annotations

import socket

from tests.harness.postfix import Postfix
from tests.integration.conftest import HOSTED, STRANGER


def converse(
    port: int, lines: list[bytes], source: str = STRANGER, closes: bool = False
) -> list[bytes]:
    """The banner and the (whole, possibly multi-line) reply to each line, in order; with
    `closes`, then what the server sends before it closes (b"" if nothing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as s:
        f = s.makefile("rb")

        def reply() -> bytes:
            out = b""
            while True:
                line = f.readline()
                out += line
                if line[3:4] != b"-":
                    return out

        replies = [reply()]
        for line in lines:
            s.sendall(line + b"\r\n")
            replies.append(reply())
        if closes:
            replies.append(f.read())
        return replies


# --------------------------------------------------------------------------- SMTPUTF8


def test_non_ascii_paths_without_smtputf8_are_refused_and_never_reach_postfix(postfix, maild):
    r = converse(
        maild.port,
        [
            b"EHLO client.example",
            "MAIL FROM:<älice@outside.example>".encode(),
            b"MAIL FROM:<a\xfflice@outside.example>",
            b"MAIL FROM:<a@outside.example>",
            "RCPT TO:<bjørn@hosted.example>".encode(),
            b"RCPT TO:<b\xffb@hosted.example>",
            b"RCPT TO:<plain8@hosted.example>",
            b"DATA",
            b"Subject: plain\r\n\r\nbody\r\n.",
            b"QUIT",
        ],
    )
    assert r[2].startswith(b"553 5.6.7 Sender address has non-ASCII characters"), r[2]
    assert r[3].startswith(b"553 5.6.7 Sender address is not valid UTF-8"), r[3]
    assert r[4].startswith(b"250"), r[4]
    assert r[5].startswith(
        b"553 5.6.7 Recipient address has non-ASCII characters: send MAIL FROM with SMTPUTF8"
    ), r[5]
    assert r[6].startswith(b"553 5.6.7 Recipient address is not valid UTF-8"), r[6]
    assert r[7].startswith(b"250") and r[9].startswith(b"250"), r
    postfix.wait_for_messages("plain8@hosted.example", 1)
    postfix.wait_queue_empty()
    # (bøb@ is the next test's)
    assert [
        k for k in postfix.all_messages() if not k.isascii() and k != "bøb@hosted.example"
    ] == []
    # each refusal is one decision line, the 8-bit byte escaped
    maild.wait_log(
        "reject: MAIL from unknown[127.0.0.5]: 553 5.6.7 Sender address has non-ASCII characters"
    )
    log = maild.wait_log("to=<b\\xffb@hosted.example> rule=smtputf8")
    assert "from=<älice@outside.example>" in log
    assert "to=<bjørn@hosted.example> rule=smtputf8" in log


def test_non_ascii_paths_with_smtputf8_are_relayed_if_valid_utf8(postfix, maild):
    r = converse(
        maild.port,
        [
            b"EHLO client.example",
            "MAIL FROM:<älice@outside.example> SMTPUTF8".encode(),
            "RCPT TO:<bøb@hosted.example>".encode(),
            b"RCPT TO:<b\xffb@hosted.example>",
            b"DATA",
            "Subject: för bøb\r\n\r\nbody\r\n.".encode(),
            b"QUIT",
        ],
    )
    assert r[2].startswith(b"250") and r[3].startswith(b"250"), r
    assert r[4].startswith(b"553 5.6.7 Recipient address is not valid UTF-8"), r[4]
    assert r[6].startswith(b"250") and b"queued as" in r[6], r[6]
    msg = postfix.wait_for_messages("bøb@hosted.example", 1)[-1]
    assert "Subject: för bøb".encode() in msg
    assert "<älice@outside.example>".encode() in msg  # Return-Path: the sender as sent


# --------------------------------------------------------------------------- EHLO, HELP


def keywords(ehlo_reply: bytes) -> set[str]:
    return {line[4:].split()[0].decode() for line in ehlo_reply.splitlines()[1:]}


MAILD_OFFERS = {"PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN", "HELP"}
MAILD_COMMANDS = {"DATA", "EHLO", "HELO", "HELP", "MAIL", "NOOP", "QUIT", "RCPT", "RSET", "VRFY"}


def test_ehlo_offers_what_maild_does_and_postfix_behind_it_takes(postfix, maild):
    ours = keywords(converse(maild.port, [b"EHLO client.example"])[1])
    assert ours == MAILD_OFFERS
    # maild passes SIZE, 8BITMIME, SMTPUTF8 and DSN on: the downstream must take them
    # (HELP is maild's own command; PIPELINING is maild's own reading of its client)
    theirs = keywords(
        converse(postfix.reinject_port, [b"EHLO client.example"], source="127.0.0.1")[1]
    )
    assert ours - {"HELP"} <= theirs, (ours, theirs)


def test_a_pipelined_transaction_is_answered_in_order(postfix, maild):
    """RFC 2920: MAIL, RCPT, RCPT and DATA in one write; then the message."""
    with socket.create_connection(
        ("127.0.0.1", maild.port), timeout=30, source_address=(STRANGER, 0)
    ) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO client.example\r\n")
        while f.readline()[3:4] == b"-":
            pass
        s.sendall(
            b"MAIL FROM:<p@outside.example>\r\nRCPT TO:<nobody@outside.example>\r\n"
            b"RCPT TO:<piped@hosted.example>\r\nDATA\r\n"
        )
        replies = [f.readline() for _ in range(4)]
        assert [r[:3] for r in replies] == [b"250", b"554", b"250", b"354"], replies
        s.sendall(b"Subject: piped\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert b"queued as" in f.readline()
        assert f.readline().startswith(b"221")
    assert len(postfix.wait_for_messages("piped@hosted.example", 1)) == 1


def test_help_lists_only_what_maild_implements(maild):
    r = converse(
        maild.port, [b"EHLO client.example", b"HELP", b"HELP AUTH", b"HELP STARTTLS", b"HELP MAIL"]
    )
    assert r[2].startswith(b"250 Supported commands: "), r[2]
    assert set(r[2].decode().split(":", 1)[1].split()) == MAILD_COMMANDS
    assert r[3].startswith(b"501") and r[4].startswith(b"501"), r[3:5]
    assert r[5].startswith(b"250 Syntax: MAIL FROM: <address>"), r[5]


def test_vrfy_of_a_bad_address_is_an_answer_not_an_internal_error(maild):
    """`VRFY a@` made the standard library's address parser raise IndexError inside
    aiosmtpd: the client got 451 4.3.0 and the log a traceback (found by the fuzzer)."""
    r = converse(
        maild.port, [b"EHLO client.example", b"VRFY a@", b"VRFY bob@hosted.example", b"NOOP"]
    )
    assert r[2].startswith(b"502 5.5.1 Could not VRFY a@"), r[2]
    assert r[3].startswith(b"252 "), r[3]
    assert r[4].startswith(b"250"), r[4]  # the session goes on
    assert "internal error" not in maild.log()


def test_auth_and_starttls_are_answered_as_postfix_answers_without_them(postfix, maild):
    """The commands maild lacks get Postfix's own replies (smtpd_sasl_auth_enable = no,
    no TLS): a permanent 50x with an enhanced status code, not aiosmtpd's 538 (AUTH
    after a STARTTLS maild does not have) or 454 (TLS later)."""
    probe = [
        b"EHLO client.example",
        b"AUTH PLAIN AGFsaWNlAHNlY3JldA==",
        b"STARTTLS",
        b"MAIL FROM:<a@outside.example>",
    ]
    ours, theirs = converse(maild.port, probe), converse(postfix.smtpd_port, probe)
    assert theirs[2].startswith(b"503 5.5.1") and theirs[3].startswith(b"502 5.5.1"), theirs
    assert ours[2:4] == theirs[2:4]
    assert ours[4].startswith(b"250"), ours[4]  # and the session goes on


def test_bdat_without_chunking_ends_the_session_as_postfix_does(postfix, maild, tmp_path):
    """maild does not offer CHUNKING: a BDAT's chunk would be read as commands (here a
    whole second transaction). Postfix with CHUNKING off answers 521 and hangs up."""
    pf = Postfix(
        tmp_path / "pf",
        hosted_domains=HOSTED,
        smtpd_options={"smtpd_discard_ehlo_keywords": "chunking"},
    )
    chunk = (
        b"RSET\r\nMAIL FROM:<x@outside.example>\r\nRCPT TO:<hidden@hosted.example>\r\n"
        b"DATA\r\nSubject: hidden\r\n\r\n.\r\n"
    )
    probe = [
        b"EHLO client.example",
        b"MAIL FROM:<a@outside.example>",
        b"RCPT TO:<bdat@hosted.example>",
        b"BDAT %d LAST\r\n" % len(chunk) + chunk,
    ]
    with pf:
        theirs = converse(pf.smtpd_port, probe, closes=True)
    ours = converse(maild.port, probe, closes=True)
    assert theirs[4] == b"521 5.5.1 Error: command not implemented\r\n", theirs
    assert ours[4] == theirs[4] and ours[5:] == theirs[5:] == [b""], (ours, theirs)
    maild.wait_log("reject: DATA from unknown[127.0.0.5]: 521 5.5.1")
    assert "hidden@hosted.example" not in maild.log()
