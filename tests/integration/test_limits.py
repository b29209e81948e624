"""Limits, each answered with its own enhanced status code."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from tests.harness.maild import Maild
from tests.integration.conftest import STRANGER, front_policy, smtp


@pytest.fixture(scope="module")
def tight(postfix, tmp_path_factory):
    policy = front_policy(
        postfix.reinject_port,
        limits={
            "message_size": 2000,
            "recipients_per_message": 3,
            "line_length": 200,
            "command_timeout": "2s",
            "data_timeout": "3s",
            "max_sessions_per_ip": 3,
        },
    )
    with Maild(tmp_path_factory.mktemp("tight"), policy) as m:
        yield m


def test_size_advertised_and_enforced(tight):
    s = smtp(tight.port)
    assert s.has_extn("size") and s.esmtp_features["size"] == "2000"
    code, text = s.docmd("MAIL", "FROM:<a@outside.example> SIZE=5000")
    assert (code, text[:5]) == (552, b"5.3.4")
    s.mail("a@outside.example")
    s.rcpt("bob@hosted.example")
    code, text = s.data(
        b"Subject: big\r\n\r\n" + b"x" * 100 + (b"\r\n" + b"y" * 100) * 30 + b"\r\n"
    )
    assert (code, text[:5]) == (552, b"5.3.4"), text
    s.quit()


def test_recipients_per_message(tight):
    s = smtp(tight.port)
    s.mail("a@outside.example")
    codes = [s.rcpt(f"u{i}@hosted.example")[0] for i in range(4)]
    assert codes == [250, 250, 250, 452]
    s.quit()


def test_line_length(tight):
    s = smtp(tight.port)
    s.mail("a@outside.example")
    s.rcpt("bob@hosted.example")
    code, text = s.data(b"Subject: long\r\n\r\n" + b"z" * 500 + b"\r\n")
    assert (code, text[:5]) == (500, b"5.5.2"), text
    s.quit()


@pytest.mark.parametrize("n", [201, 202, 203])
def test_a_line_one_to_three_over_line_length_is_refused(tight, postfix, n):
    """line_length = 200: 200 characters of text, CRLF not counted (RFC 5321 4.5.3.1.6)."""
    with smtp(tight.port) as s:
        s.mail("a@outside.example")
        s.rcpt(f"over{n}@hosted.example")
        code, text = s.data(b"Subject: over\r\n\r\n" + b"z" * n + b"\r\n")
    assert (code, text[:5]) == (500, b"5.5.2"), text
    assert b"longer than 200 characters" in text, text
    tight.wait_log(f"to=<over{n}@hosted.example> rule=limits")
    assert postfix.messages(f"over{n}@hosted.example") == []


def test_a_line_of_line_length_arrives_whole_with_or_without_a_leading_dot(tight, postfix):
    """200 characters are allowed; a line starting with a dot goes on the wire as 201
    (smtplib doubles the dot) and the doubled dot is not counted."""
    plain, dotted = b"p" * 200, b"." + b"d" * 199
    with smtp(tight.port) as s:
        s.sendmail(
            "a@outside.example",
            ["fits@hosted.example"],
            b"Subject: fits\r\n\r\n" + plain + b"\r\n" + dotted + b"\r\n",
        )
    msg = postfix.wait_for_messages("fits@hosted.example", 1)[-1].replace(b"\r\n", b"\n")
    assert b"\n" + plain + b"\n" + dotted + b"\n" in msg, msg[-500:]


def test_command_timeout_says_421(tight):
    with socket.create_connection(
        ("127.0.0.1", tight.port), timeout=10, source_address=(STRANGER, 0)
    ) as c:
        c.recv(1000)
        time.sleep(3)
        assert c.recv(1000).startswith(b"421 4.4.2")


def read_reply(c: socket.socket) -> bytes:
    """One whole (possibly multi-line) SMTP reply."""
    buf = b""
    while True:
        buf += c.recv(4096)
        lines = buf.split(b"\r\n")
        if len(lines) > 1 and any(len(x) >= 4 and x[3:4] == b" " for x in lines[:-1]):
            return buf


def test_data_deadline_stops_slowloris(tight):
    with socket.create_connection(
        ("127.0.0.1", tight.port), timeout=10, source_address=(STRANGER, 0)
    ) as c:
        read_reply(c)
        for line in [
            b"EHLO x\r\n",
            b"MAIL FROM:<a@outside.example>\r\n",
            b"RCPT TO:<b@hosted.example>\r\n",
            b"DATA\r\n",
        ]:
            c.sendall(line)
            assert read_reply(c)[:1] in b"23", line
        got = b""
        c.settimeout(0.05)
        for _ in range(10):  # one byte a second: under the 2 s idle timer, past the 3 s deadline
            try:
                c.sendall(b"x")
            except OSError:
                break
            time.sleep(1)
            with contextlib.suppress(TimeoutError, BlockingIOError):
                got += c.recv(1000)
            if got:
                break
        assert got.startswith(b"421 4.4.2"), got


def test_sessions_per_ip(tight):
    conns = [
        socket.create_connection(
            ("127.0.0.1", tight.port), timeout=10, source_address=(STRANGER, 0)
        )
        for _ in range(4)
    ]
    try:
        banners = [c.recv(1000) for c in conns]
        assert [b[:3] for b in banners[:3]] == [b"220"] * 3
        assert banners[3].startswith(b"421 4.7.0"), banners[3]
        # another address is not affected
        with socket.create_connection(
            ("127.0.0.1", tight.port), timeout=10, source_address=("127.0.0.6", 0)
        ) as other:
            assert other.recv(1000).startswith(b"220")
    finally:
        for c in conns:
            c.close()
