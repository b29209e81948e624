"""Address parsing keeps what aiosmtpd would lose, and finds every possible destination."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maild import address
from maild.address import (
    PathError,
    canonical,
    declares_smtputf8,
    eight_bit,
    parse_params,
    parse_path,
    split_arg,
)

HOSTED = frozenset({"hosted.example", "mx.hosted.example"})


@pytest.mark.parametrize(
    "path, dests",
    [
        ("<bob@hosted.example>", {"hosted.example"}),
        ("<Bob@HOSTED.Example.>", {"hosted.example"}),
        ("<relaytest%outside.example@hosted.example>", {"hosted.example", "outside.example"}),
        ("<relaytest%outside.example@[127.0.0.1]>", {"[127.0.0.1]", "outside.example"}),
        ('<"relaytest@outside.example">', {"", "outside.example"}),
        ('<"relaytest%outside.example">', {"", "outside.example"}),
        ("<relaytest@outside.example@[127.0.0.1]>", {"outside.example", "[127.0.0.1]"}),
        ('<"relaytest@outside.example"@[127.0.0.1]>', {"outside.example", "[127.0.0.1]"}),
        ("<relaytest@outside.example@hosted.example>", {"outside.example", "hosted.example"}),
        ("<@[127.0.0.1]:relaytest@outside.example>", {"[127.0.0.1]", "outside.example"}),
        ("<@hosted.example:relaytest@outside.example>", {"hosted.example", "outside.example"}),
        ("<outside.example!relaytest>", {"outside.example", ""}),
        ("<outside.example!relaytest@hosted.example>", {"outside.example", "hosted.example"}),
        ("<a!b!user@hosted.example>", {"a", "b", "hosted.example"}),
    ],
)
def test_destinations_cover_every_reading(path, dests):
    assert parse_path(path).destinations() == frozenset(dests)


def test_local_only_when_every_reading_is_hosted():
    assert parse_path("<bob@hosted.example>").is_local_to(HOSTED)
    assert parse_path("<bob%mx.hosted.example@hosted.example>").is_local_to(HOSTED)
    assert not parse_path("<bob%evil.example@hosted.example>").is_local_to(HOSTED)
    assert not parse_path("<bob>").is_local_to(HOSTED)


def test_raw_is_kept_and_quotes_removed():
    a = parse_path('<"john smith"@hosted.example>')
    assert a.raw == '<"john smith"@hosted.example>'
    assert a.local == "john smith" and a.quoted
    assert a.addr == "john smith@hosted.example"


def test_null_path():
    a = parse_path("<>")
    assert a.is_null and a.addr == ""


def test_split_arg_with_params_and_quoted_bracket():
    assert split_arg('<"a>b"@x.example> SIZE=10 BODY=8BITMIME') == (
        '<"a>b"@x.example>',
        "SIZE=10 BODY=8BITMIME",
    )
    assert split_arg("bob@x.example NOTIFY=NEVER") == ("bob@x.example", "NOTIFY=NEVER")


@pytest.mark.parametrize("bad", ["<a@b", '<"abc@x>', "<@x>", "<a\r@b>", "<@a,b:c@d>", "<@@>"])
def test_malformed_paths_raise(bad):
    with pytest.raises(PathError):
        parse_path(split_arg(bad[1:] if bad.startswith(":") else bad)[0])


def test_params():
    assert parse_params("SIZE=100 BODY=8BITMIME SMTPUTF8") == [
        "SIZE=100",
        "BODY=8BITMIME",
        "SMTPUTF8",
    ]
    with pytest.raises(PathError):
        parse_params("SIZE= ")
    with pytest.raises(PathError):
        parse_params("=x")


def test_canonical_folds_case_and_plus_tags():
    assert canonical("Alice+news@Example.COM") == "alice@example.com"
    assert canonical("alice@example.com.") == "alice@example.com"
    assert canonical("+weird@example.com") == "+weird@example.com"


@pytest.mark.parametrize("degenerate", ["x@@", "x@", "X@.", "a@b@", "x@@z", '"a@b"@Example.com.'])
def test_canonical_is_idempotent_on_degenerate_input(degenerate):
    once = canonical(degenerate)
    assert canonical(once) == once


@given(st.text(max_size=80))
def test_parser_never_crashes(text):
    try:
        a = parse_path(split_arg(text)[0])
    except PathError:
        return
    assert isinstance(a.destinations(), frozenset)


@pytest.mark.parametrize(
    ("wire", "kind"),
    [
        (b"<bob@hosted.example>", None),
        ("<bøb@hosted.example>".encode(), "utf-8"),
        ("<用户@例子.广告>".encode(), "utf-8"),
        (b"<b\xffb@hosted.example>", "malformed"),
        (b"<b\xc3@hosted.example>", "malformed"),  # a truncated sequence
        (b"<b\xc0\xafb@hosted.example>", "malformed"),  # an overlong '/'
        (b"<b\xed\xa0\x80b@hosted.example>", "malformed"),  # an encoded surrogate
    ],
)
def test_eight_bit_tells_utf8_from_other_bytes(wire, kind):
    """As aiosmtpd hands a command argument over: UTF-8 with surrogateescape."""
    assert eight_bit(wire.decode("utf-8", "surrogateescape")) == kind


def test_declares_smtputf8():
    assert declares_smtputf8(["BODY=8BITMIME", "smtputf8"])
    assert not declares_smtputf8(["BODY=8BITMIME", "SMTPUTF8=yes"])
    assert not declares_smtputf8([])


@settings(deadline=None)  # a property, not a timing: the machine is shared
@given(st.text(alphabet=' <>"\\a@\x01\x7f', max_size=30))
def test_split_arg_and_control_characters_as_the_character_loops_had_it(text):
    # Without a quote the closing ">" is found by find(), and control characters by a
    # pattern: the same answers as the character-by-character scan.
    s = text.lstrip()
    try:
        expected: int | None = address._scan_closing_bracket(s)
    except PathError:
        expected = None
    if s.startswith("<"):
        if expected is None:
            with pytest.raises(PathError):
                split_arg(text)
        else:
            assert split_arg(text) == (s[: expected + 1], s[expected + 1 :].strip())
    path = split_arg(text)[0] if not s.startswith("<") or expected is not None else "<a@b>"
    inner = path[1:-1] if path.startswith("<") and path.endswith(">") else path
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in inner):
        with pytest.raises(PathError, match="control characters"):
            parse_path(path)
