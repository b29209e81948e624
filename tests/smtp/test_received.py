"""maild's Received line and the login parsed from Postfix's."""

import email.parser
import email.policy

from hypothesis import given, settings
from hypothesis import strategies as st

from maild.address import parse_path
from maild.policy.context import Client
from maild.smtp import xforward
from maild.smtp.downstream import Reply
from maild.smtp.received import authenticated_login, received_header
from maild.smtp.xforward import xtext
from maild.smtp.xforward import xtext_decode as _xtext_decode


def headers(text: str):
    return email.parser.HeaderParser(policy=email.policy.compat32).parsestr(text)


def test_received_names_the_real_client():
    h = received_header(
        Client(addr="203.0.113.9", name="mail.client.example", helo="client", proto="ESMTPA"),
        "mx.hosted.example",
        "ABCDEF0123",
        [parse_path("<bob@hosted.example>")],
        "Sun, 22 Nov 2026 12:00:00 +0000",
    )
    text = h.decode()
    assert text.startswith("Received: from client (mail.client.example [203.0.113.9])\r\n")
    assert "by mx.hosted.example (maild) with ESMTPA id ABCDEF0123" in text
    assert "for <bob@hosted.example>;" in text and text.endswith("+0000\r\n")


def test_received_header_cannot_be_injected_through_helo():
    h = received_header(
        Client(addr="2001:db8::1", helo="evil\r\nBcc: x (y)"), "mx", "ID", [], "date"
    ).decode()
    assert h.count("\r\n") == 3 and "Bcc: x" not in h and "[IPv6:2001:db8::1]" in h


def test_login_only_from_topmost_received():
    top = headers(
        "Received: from x (y [1.2.3.4])\n\t(Authenticated sender: alice)\n\tby mx (Postfix)\n"
        "Received: from evil\n\t(Authenticated sender: mallory)\n\n"
    )
    assert authenticated_login(top) == "alice"
    forged = headers(
        "Received: from x (y [1.2.3.4])\n\tby mx (Postfix)\n"
        "Received: from evil (Authenticated sender: mallory)\n\n"
    )
    assert authenticated_login(forged) == ""


def test_xtext_round_trip():
    for s in ["plain", "a+b=c", "ümlaut", "sp ace"]:
        enc = xtext(s)
        assert " " not in enc and "=" not in enc
        assert _xtext_decode(enc).encode("latin-1").decode("utf-8") == s
    assert _xtext_decode("bad+Z1") is None


@settings(deadline=None)  # a property, not a timing: the machine is shared
@given(st.text(max_size=40))
def test_xtext_is_the_character_by_character_encoding(s):
    # text with nothing to encode is returned as it is: the same as encoding each character
    assert xtext(s) == xforward._xtext_chars(s)


def test_multiline_reply_rendering():
    assert Reply(250, "one\ntwo").smtp() == "250-one\r\n250 two"
    assert Reply(550, "5.1.1 no").smtp() == "550 5.1.1 no"


def test_the_date_is_format_datetime_of_localtime_within_each_second():
    # made once a second: the same text as formatting the local time of each call
    import datetime
    from email.utils import format_datetime

    from maild.smtp.received import date_now

    for t in (1_800_000_000.2, 1_800_000_000.9, 1_800_000_001.0, 1_799_999_999.5, 1_800_003_600.4):
        expected = format_datetime(datetime.datetime.fromtimestamp(t).astimezone())
        assert date_now(t) == expected
