"""Header lines maild adds, and the X-Maild-* lines it removes from outside."""

from maild.config import Customer
from maild.policy.context import Identity
from maild.smtp.own_headers import customer_header, header_line, strip_own_headers


def test_strip_removes_forged_maild_headers_with_continuations():
    msg = (
        b"From: a@b.example\r\nX-Maild-Customer: bank\r\n\t(by login ceo)\r\n"
        b"x-maild-verdict: pass\r\nSubject: hi\r\n\tthere\r\n\r\nX-Maild-Customer: in body stays\r\n"
    )
    out = strip_own_headers(msg)
    assert out == (
        b"From: a@b.example\r\nSubject: hi\r\n\tthere\r\n\r\nX-Maild-Customer: in body stays\r\n"
    )


def test_strip_leaves_clean_messages_untouched():
    msg = b"From: a@b.example\r\nX-Mailer: x\r\n\r\nbody\r\n"
    assert strip_own_headers(msg) is msg


def test_customer_header_names_customer_and_method():
    c = Customer(name="acme")
    assert (
        customer_header(Identity(c, "login", "alice"))
        == b"X-Maild-Customer: acme (by login alice)\r\n"
    )
    assert customer_header(Identity(c, "network")) == b"X-Maild-Customer: acme (by network)\r\n"
    assert customer_header(Identity()) == b"X-Maild-Customer: none (not identified)\r\n"


def test_header_line_folds_and_cannot_inject():
    line = header_line("X-Maild-Verdict", "a\r\nBcc: evil " + "word " * 30)
    assert b"\r\nBcc:" not in line
    assert all(len(x) <= 78 for x in line.split(b"\r\n"))
    assert line.endswith(b"\r\n") and line.count(b"\r\n\t") >= 1
