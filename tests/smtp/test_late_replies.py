"""LateReplies.key: what makes a retry the same message as the attempt the downstream
took late (the end-to-end case is tests/reliability/test_downstream_faults.py)."""

from __future__ import annotations

import pytest

from maild.address import parse_path
from maild.components import parse
from maild.policy.context import Client, Context, Message
from maild.smtp.proxy import LateReplies, message_id

CONFIG = parse({"postmaster": {"domains": ["hosted.example"]}})


def key(
    content: bytes,
    sender: str = "<s@outside.example>",
    rcpts: tuple[str, ...] = ("<a@hosted.example>", "<b@hosted.example>"),
) -> str:
    ctx = Context(
        config=CONFIG,
        session_id="TEST",
        client=Client(addr="192.0.2.7"),
        sender=parse_path(sender),
        recipients=[parse_path(r) for r in rcpts],
    )
    ctx.message = Message(content)
    return LateReplies.key(ctx)


def msg(
    date: str, msgid: str | None = "<1234.abc@outside.example>", body: bytes = b"hi\r\n"
) -> bytes:
    head = f"From: s@outside.example\r\nDate: {date}\r\nSubject: news\r\n"
    if msgid is not None:
        head += f"Message-ID: {msgid}\r\n"
    return head.encode() + b"\r\n" + body


FIRST, RETRY = "Thu, 3 Dec 2026 06:00:00 +0000", "Thu, 3 Dec 2026 06:00:31 +0000"


def test_a_rebuilt_retry_with_the_same_message_id_is_the_same_message():
    assert key(msg(FIRST)) == key(msg(RETRY, body=b"hi, re-rendered\r\n"))
    # recipients in another order are the same envelope
    assert key(msg(FIRST)) == key(msg(RETRY), rcpts=("<b@hosted.example>", "<a@hosted.example>"))


@pytest.mark.parametrize(
    "other",
    [
        {"sender": "<t@outside.example>"},
        {"rcpts": ("<a@hosted.example>",)},
        {"rcpts": ("<a@hosted.example>", "<b@hosted.example>", "<c@hosted.example>")},
    ],
)
def test_another_envelope_is_another_message(other):
    assert key(msg(FIRST)) != key(msg(FIRST), **other)


def test_another_message_id_is_another_message():
    assert key(msg(FIRST)) != key(msg(FIRST, msgid="<1235.abc@outside.example>"))


@pytest.mark.parametrize(
    "msgid", [None, "", "no-brackets@outside.example", "<a@b> <c@d>", "(comment) <a@b>"]
)
def test_without_a_plain_message_id_the_content_identifies_it(msgid):
    """Byte-identical retries still match; a changed one does not (the window that
    remains, docs/reliability.md)."""
    assert key(msg(FIRST, msgid)) == key(msg(FIRST, msgid))
    assert key(msg(FIRST, msgid)) != key(msg(RETRY, msgid))


def test_message_id_is_read_from_the_header_only():
    assert message_id(Message(msg(FIRST, "  <x@y.example>"))) == "<x@y.example>"
    assert message_id(Message(msg(FIRST, "<x@y\r\n .example>"))) is None  # folded inside
    folded = msg(FIRST, None).replace(b"\r\n\r\n", b"\r\nMessage-ID:\r\n <x@y.example>\r\n\r\n")
    assert message_id(Message(folded)) == "<x@y.example>"
    twice = msg(FIRST).replace(b"\r\n\r\n", b"\r\nMessage-ID: <z@y.example>\r\n\r\n")
    assert message_id(Message(twice)) is None
    in_body = msg(FIRST, None, body=b"Message-ID: <x@y.example>\r\n")
    assert message_id(Message(in_body)) is None
