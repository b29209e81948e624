"""SMTP smuggling: every end-of-data variant (ANCHORS.md section 2) yields no hidden message.

Each payload carries a second, hidden transaction to smuggled@hosted.example after a
non-standard end-of-data marker, then the real CRLF.CRLF. The downstream must never
receive the hidden message; the control test shows the same payloads do smuggle mail
through Postfix's loopback re-injection smtpd on its own, so this test can fail.
"""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from tests.integration.conftest import STRANGER

VARIANTS = [
    b"\n.\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
]
HIDDEN = (
    b"MAIL FROM:<evil@outside.example>\r\nRCPT TO:<smuggled@hosted.example>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nhidden\r\n"
)


def converse(
    port: int, chunks: list[bytes], source: str = STRANGER, *, half_close: bool = True
) -> bytes:
    """Send raw bytes exactly as given; return everything the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        out = s.recv(4096)
        for chunk in chunks:
            try:
                s.sendall(chunk)
            except OSError:  # closed by the server after a refusal
                break
            time.sleep(0.05)
        if half_close:  # maild answers everything sent before the EOF (BUG-15)
            with contextlib.suppress(OSError):  # the server may have closed it already
                s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        while True:
            try:
                data = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            out += data
    return out


def payload(ending: bytes, rcpt: str = "bob@hosted.example") -> list[bytes]:
    return [
        b"EHLO client.example\r\n",
        b"MAIL FROM:<a@outside.example>\r\n",
        f"RCPT TO:<{rcpt}>\r\n".encode(),
        b"DATA\r\n",
        b"Subject: carrier\r\n\r\nbody" + ending + HIDDEN + b".\r\nQUIT\r\n",
    ]


@pytest.mark.parametrize("ending", VARIANTS, ids=[repr(v)[2:-1] for v in VARIANTS])
def test_no_hidden_message_reaches_postfix(postfix, maild, ending):
    out = converse(maild.port, payload(ending, "carrier@hosted.example"))
    assert b"550 5.5.2" in out or b"550 5.6.0" in out, out
    assert b"250 2.0.0 Ok: queued" not in out
    postfix.wait_queue_empty()
    assert postfix.messages("smuggled@hosted.example") == []
    assert postfix.messages("carrier@hosted.example") == []


def test_bare_lf_in_a_command_line_is_refused(maild):
    out = converse(maild.port, [b"EHLO client.example\n", b"QUIT\r\n"])
    assert b"500 5.5.2" in out, out
    out = converse(maild.port, [b"EHLO client.example\r\n", b"MAIL FROM:<a@b.example>\rX\r\n"])
    assert b"500 5.5.2" in out, out


AFTER = b"NOOP\r\nMAIL FROM:<evil@outside.example>\r\nRCPT TO:<after@hosted.example>\r\n"


@pytest.mark.parametrize(
    "chunks",
    [
        [
            b"EHLO client.example\r\nMAIL FROM:<a@outside.example>\r\nRCPT TO:<bob@hosted.example>\r\n"
            b"DATA\r\nSubject: x\r\n\r\nbare\nlf\r\n.\r\n" + AFTER
        ],
        [b"EHLO client.example\r\nNOOP\n" + AFTER],
    ],
    ids=["in-data", "in-a-command"],
)
def test_nothing_sent_after_a_bare_line_ending_is_read_as_a_command(maild, chunks):
    """The session ends at the refusal, although the client's next commands are already
    in maild's buffer (aiosmtpd ran them before the close took effect)."""
    out = converse(maild.port, chunks, half_close=False)
    refusal = out.rfind(b" 5.5.2 ")
    assert refusal > 0 and out.endswith(b"\r\n") and out[refusal:].count(b"\r\n") == 1, out
    maild.wait_log("rule=smuggling")
    assert "after@hosted.example" not in maild.log()


def test_two_pipelined_messages_are_two_messages_once_each(postfix, maild):
    one = (
        b"MAIL FROM:<a@outside.example>\r\nRCPT TO:<pipe@hosted.example>\r\nDATA\r\n"
        b"Subject: first\r\n\r\n1\r\n.\r\n"
    )
    two = one.replace(b"first", b"second")
    out = converse(
        maild.port, [b"EHLO client.example\r\n", one + two + b"QUIT\r\n"], half_close=False
    )
    assert out.count(b"queued as") == 2, out
    msgs = postfix.wait_for_messages("pipe@hosted.example", 2)
    time.sleep(0.5)
    msgs = postfix.messages("pipe@hosted.example")
    assert sorted(m.count(b"Subject: first") for m in msgs) == [0, 1]
    assert len(msgs) == 2


def test_control_postfix_alone_would_be_smuggled(postfix):
    """Without maild in front, the loopback re-injection smtpd takes some variants."""
    for ending in VARIANTS:
        converse(
            postfix.reinject_port, payload(ending, "control@hosted.example"), source="127.0.0.1"
        )
    postfix.wait_queue_empty()
    assert len(postfix.messages("smuggled@hosted.example")) >= 1, (
        "Postfix refused every variant on its own: the smuggling tests prove nothing here"
    )
    # leave no trace for the maild tests above (they may run after this one)
    for f in postfix.maildir("smuggled@hosted.example").glob("*/*"):
        f.unlink()
