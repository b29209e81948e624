"""Recognising list mail and the per-message rules (RFC 2369, RFC 8058, To:/body)."""

from __future__ import annotations

import base64
import email.parser
import email.policy

import pytest

from maild.optin.detect import (
    automatic,
    header_list_id,
    is_auto_reply,
    list_signals,
    unnamed_recipients,
    unsubscribe_problem,
)


def hdrs(*lines: str):
    raw = "\r\n".join(lines).encode() + b"\r\n\r\n"
    return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)


def test_signals():
    assert list_signals(hdrs("List-Id: News <news.acme.example>", "List-Post: <mailto:x@y>")) == [
        "List-Id",
        "List-Post",
    ]
    assert list_signals(hdrs("Precedence: BULK")) == ["Precedence: bulk"]
    assert list_signals(hdrs("Precedence: junk", "Subject: hi")) == []
    # field names in any case, and a name with a space before its colon is another field
    assert list_signals(
        hdrs("LIST-ID: x", "list-unsubscribe: <mailto:u@x>", "precedence: List")
    ) == [
        "List-Id",
        "List-Unsubscribe",
        "Precedence: list",
    ]
    assert list_signals(hdrs("List-Post : <mailto:x@y>")) == []
    assert header_list_id(hdrs("List-Id: News <News.Acme.Example>")) == "news.acme.example"
    assert header_list_id(hdrs("Subject: x")) == ""


def test_auto_replies():
    assert is_auto_reply(hdrs("Auto-Submitted: auto-replied (vacation)"))
    assert not is_auto_reply(hdrs("Auto-Submitted: no"))
    assert automatic(hdrs("Subject: Re: confirm"), null_sender=False) == ""
    assert "null envelope sender" in automatic(hdrs("Subject: x"), null_sender=True)
    assert automatic(hdrs("Auto-Submitted: auto-generated"), False).startswith("Auto-Submitted")
    assert automatic(hdrs("Precedence: junk"), False) == "Precedence: junk"
    assert automatic(hdrs("X-Autoreply: yes"), False) == "X-Autoreply header"


@pytest.mark.parametrize(
    "lines, needle",
    [
        ((), "must carry a List-Unsubscribe header"),
        (("List-Unsubscribe: mailto:leave@x.example",), "in angle brackets"),
        (("List-Unsubscribe: <http://x.example/u>",), "in angle brackets"),
        (("List-Unsubscribe: <https://x.example/u>",), "(found: none)"),
        (
            (
                "List-Unsubscribe: <https://x.example/u>",
                "List-Unsubscribe-Post: List-Unsubscribe=one-click",
            ),
            "found: 'List-Unsubscribe=one-click'",
        ),
        (
            (
                "List-Unsubscribe: <https://x.example/u>",
                "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
                "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
            ),
            "exactly one",
        ),
    ],
)
def test_unsubscribe_problems(lines, needle):
    assert needle in unsubscribe_problem(hdrs(*lines), require_one_click=False)


@pytest.mark.parametrize(
    "lines",
    [
        ("List-Unsubscribe: <mailto:leave@x.example?subject=unsubscribe>",),
        (
            "List-Unsubscribe: <https://x.example/u?id=1>, <mailto:leave@x.example>",
            "List-Unsubscribe-Post:  List-Unsubscribe=One-Click ",
        ),
    ],
)
def test_unsubscribe_ok(lines):
    assert unsubscribe_problem(hdrs(*lines), require_one_click=False) == ""


def test_require_one_click():
    h = hdrs("List-Unsubscribe: <mailto:leave@x.example>")
    assert "RFC 8058 one-click" in unsubscribe_problem(h, require_one_click=True)


def msg(to: str, body: bytes, extra: str = "") -> tuple[bytes, object]:
    raw = (f"To: {to}\r\nSubject: s\r\n{extra}\r\n").encode() + body
    return raw, hdrs(f"To: {to}")


def test_recipient_named_in_to_or_body():
    raw, h = msg("Bob <Bob@Example.org>", b"hello\r\n")
    assert unnamed_recipients(raw, h, ["bob@example.org"]) == []
    raw, h = msg("list@x.example", b"This copy is for bob@example.org\r\n")
    assert unnamed_recipients(raw, h, ["bob@example.org", "eve@example.org"]) == ["eve@example.org"]


def test_recipient_found_in_encoded_bodies():
    b64 = base64.b64encode(b"<p>Sent to <b>bob@example.org</b></p>").decode()
    raw, h = msg(
        "list@x.example",
        b64.encode() + b"\r\n",
        "MIME-Version: 1.0\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n",
    )
    assert unnamed_recipients(raw, h, ["bob@example.org"]) == []
    qp = b"A long line that the list software wrapped for bob@exam=\r\nple.org in QP\r\n"
    raw, h = msg(
        "list@x.example",
        qp,
        "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n",
    )
    assert unnamed_recipients(raw, h, ["bob@example.org"]) == []
