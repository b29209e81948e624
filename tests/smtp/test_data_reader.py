"""maild.smtp.data.read_data (DATA read a block at a time) decides exactly what the
line-at-a-time reader it replaced decided (`line_reader` below, kept verbatim as the
reference): the same (content, problem, fatal), ClientEOF in the same cases, and the
same bytes left unread in the StreamReader, for random byte streams fed in random
chunks (the same chunks, at the same moments, to both readers).
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from maild.smtp.data import ClientEOF
from maild.smtp.data import read_data as block_reader


async def read_data(
    reader: asyncio.StreamReader, limit: int, max_line: int
) -> tuple[bytes, str | None, bool]:
    """maild.smtp.data.read_data, its Abort given as the reference's (reply, fatal)."""
    content, abort = await block_reader(reader, limit, max_line)
    return content, abort.reply if abort else None, bool(abort and abort.kind.fatal)


LIMIT = 998  # line_length, as MaildSMTP passes it: the longest text, stuffed dot not counted


async def line_reader(
    reader: asyncio.StreamReader, limit: int, max_line: int
) -> tuple[bytes, str | None, bool]:
    """MaildSMTP._read_data before the block reader (5160c42), minus the timer, with two
    fixes: the rest of an overlong line is dropped up to its CRLF (5160c42 restarted a line
    at the last byte it had buffered, so a pause after "AAAA...A." then CRLF ended DATA
    where the client's line did not end), and `max_line` is the longest text, one more
    with a stuffed dot (5160c42 was given line_length + 3 and took that much text).

    The StreamReader's limit is max_line + 1 (see run()): a line without a leading dot
    that fills it is too long as well."""
    buf = bytearray()
    problem: str | None = None
    skipping = False
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.IncompleteReadError:
            raise ClientEOF() from None  # the message is incomplete: nothing relayed
        except asyncio.LimitOverrunError as e:
            await reader.read(e.consumed)
            problem = problem or too_long(max_line)
            buf.clear()
            skipping = True
            continue
        if skipping:  # the rest of an overlong line, up to its CRLF, whatever it holds
            skipping = False
            continue
        n = len(line)
        if n - 2 > max_line and line[:1] != b".":  # one over, and no stuffed dot to discount
            problem = problem or too_long(max_line)
            buf.clear()
            continue
        if line.find(b"\n", 0, n - 1) >= 0 or line.find(b"\r", 0, n - 2) >= 0:
            return (
                b"",
                (
                    "550 5.5.2 Message refused: bare <LF> or <CR> received "
                    "(RFC 5321 2.3.8); send lines ending in CRLF"
                ),
                True,
            )
        if b"\x00" in line:
            return b"", "550 5.6.0 Message refused: NUL character in message data", True
        if line == b".\r\n":
            break
        if problem:
            continue
        if line[0:1] == b".":
            line = line[1:]
        buf += line
        if limit and len(buf) > limit:
            problem = f"552 5.3.4 Message size exceeds fixed limit ({limit} bytes)"
            buf.clear()
    return bytes(buf), problem, False


def too_long(max_line: int) -> str:
    return (
        f"500 5.5.2 Message line longer than {max_line} characters "
        "(RFC 5321 4.5.3.1.6); wrap long lines or use quoted-printable"
    )


def run(fn, chunks: list[bytes], yields: list[bool], limit: int, max_line: int, eof: bool = True):
    """Feed `chunks` to a StreamReader (a yield to the reader after chunk i when
    yields[i]), then EOF; return (outcome, bytes left unread, bytes in the buffer when
    the reader returned)."""

    async def main():
        reader = asyncio.StreamReader(limit=max_line + 1)
        left: list[bytes] = []

        async def consume():
            try:
                result = await fn(reader, limit, max_line)
            except ClientEOF:
                result = "ClientEOF"
            left.append(bytes(reader._buffer))
            return result

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0)
        for chunk, y in zip(chunks, yields, strict=False):
            reader.feed_data(chunk)
            if y:
                for _ in range(3):
                    await asyncio.sleep(0)
        for _ in range(3):
            await asyncio.sleep(0)
        if eof and not task.done():
            reader.feed_eof()
        result = await asyncio.wait_for(task, 5)
        return result, left[0], bytes(reader._buffer)

    return asyncio.run(main())


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def same(data: bytes, chunks: list[bytes], yields: list[bool], limit: int, max_line: int):
    new = run(read_data, chunks, yields, limit, max_line)
    old = run(line_reader, chunks, yields, limit, max_line)
    assert new == old, (data, chunks)
    return new


PIECES = [
    b"\r\n",
    b"\r\n.\r\n",
    b".\r\n",
    b".",
    b"..",
    b"\r",
    b"\n",
    b"\x00",
    b"a",
    b"ab",
    b"Subject: x",
    b"a" * 7,
    b"a" * 8,
    b"a" * 9,
    b"a" * 12,
    b"a" * 13,
    b"b" * 30,
    b"\r\n.",
    b"\n.\n",
    b"\r.\r",
    b"QUIT\r\n",
]
streams = st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=12)), max_size=40).map(
    b"".join
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=streams,
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    yields=st.lists(st.booleans(), min_size=13, max_size=13),
    limit=st.sampled_from([0, 0, 10, 40, 100]),
    max_line=st.sampled_from([8, 12, 40, LIMIT]),
)
@example(data=b".\r\n", cuts=[], yields=[True] * 13, limit=0, max_line=LIMIT)
@example(data=b"..x\r\n.\r\nQUIT\r\n", cuts=[1, 2], yields=[True] * 13, limit=0, max_line=LIMIT)
@example(
    data=b"a\r\n.\r\nQUIT\r\n", cuts=[1, 2, 3, 4, 5], yields=[True] * 13, limit=0, max_line=LIMIT
)
@example(data=b"aaaaaaaaaaaaaaa.\r\nb\r\n.\r\n", cuts=[16], yields=[True] * 13, limit=0, max_line=8)
@example(data=b"aaaaaaaaaaaaaaa\n\r\n.\r\n", cuts=[], yields=[True] * 13, limit=0, max_line=8)
def test_same_as_the_line_reader(data, cuts, yields, limit, max_line):
    same(data, split(data, cuts), yields, limit, max_line)


def message(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\r\n" for line in lines)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(
        st.sampled_from(
            [
                b"",
                b".",
                b"..",
                b"x" * 78,
                b"y" * 998,
                b".z" * 400,
                b"Subject: hello",
                b"y" * 999,
                b"y" * 1000,
                b"y" * 1001,
                b"." + b"y" * 998,
                b"." + b"y" * 999,
                b".." + b"y" * 998,
            ]
        ),
        max_size=60,
    ),
    tail=st.sampled_from(
        [b".\r\n", b".\r\nQUIT\r\n", b".\r\nMAIL FROM:<a@b>\r\nRCPT", b"", b".", b".\r"]
    ),
    cuts=st.lists(st.integers(0, 200_000), max_size=8),
    yields=st.lists(st.booleans(), min_size=9, max_size=9),
    limit=st.sampled_from([0, 5000, 20000]),
)
def test_same_on_realistic_messages(lines, tail, cuts, yields, limit):
    data = message(lines) + tail
    same(data, split(data, cuts), yields, limit, LIMIT)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, 1000, 65536])
def test_markers_split_at_every_boundary(size):
    body = message(
        [b"Subject: t", b"", b".leading dot", b"..", b"x" * 998, b"." + b"x" * 998, b"end"]
    )
    data = body + b".\r\nQUIT\r\n"
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    result, _, left = same(data, chunks, [True] * len(chunks), 0, LIMIT)
    assert result == (body.replace(b"\r\n.", b"\r\n"), None, False)
    assert left == b"QUIT\r\n"


@pytest.mark.parametrize("max_line", [8, 40, LIMIT])
@pytest.mark.parametrize("d", [-2, -1, 0, 1, 2])
@pytest.mark.parametrize("where", [0, 1, 5])
@pytest.mark.parametrize("stuffed", [False, True], ids=["plain", "stuffed"])
def test_line_length_boundary(max_line, d, where, stuffed):
    """max_line + d characters of text: refused when d > 0; a line that starts with a dot
    is sent with one more (the client doubles it) and is judged by its text."""
    text = b"." * stuffed + b"L" * (max_line + d - stuffed)
    lines = [b"x" * (max_line - 1 - i % 3) for i in range(6)]
    lines.insert(where, b"." * stuffed + text)
    data = message(lines) + b".\r\nQUIT\r\n"
    result, _, left = same(data, [data], [True], 0, max_line)
    assert left == b"QUIT\r\n"
    if d > 0:
        assert result == (b"", too_long(max_line), False)
    else:
        lines[where] = text
        assert result == (message(lines), None, False)


def test_examples():
    def one(data: bytes, max_line: int = LIMIT, limit: int = 0):
        return same(data, [data], [True], limit, max_line)

    assert one(b".\r\nQUIT\r\n")[:2] == ((b"", None, False), b"QUIT\r\n")
    assert one(b"..\r\n.\r\n")[0] == (b".\r\n", None, False)
    assert one(b".a\r\n.b\r\n.\r\n")[0] == (b"a\r\nb\r\n", None, False)
    assert one(b"a\nb\r\n.\r\nMAIL")[:2] == (
        (
            b"",
            "550 5.5.2 Message refused: bare <LF> or <CR> received (RFC 5321 2.3.8); "
            "send lines ending in CRLF",
            True,
        ),
        b".\r\nMAIL",
    )
    assert one(b"a\x00\r\n.\r\n")[0][1:] == (
        "550 5.6.0 Message refused: NUL character in message data",
        True,
    )
    assert one(b"a" * 999 + b"\r\nb\r\n.\r\n")[0][1].startswith("500 5.5.2")
    assert one(b"a" * 998 + b"\r\n.\r\n")[0] == (b"a" * 998 + b"\r\n", None, False)
    # the dot a client doubles for transparency is not counted (RFC 5321 4.5.3.1.6)
    assert one(b".." + b"a" * 997 + b"\r\n.\r\n")[0] == (b"." + b"a" * 997 + b"\r\n", None, False)
    assert one(b"." + b"a" * 999 + b"\r\n.\r\n")[0][1].startswith("500 5.5.2")
    assert one(b"abc\r\n" * 10 + b".\r\n", limit=49)[0][1].startswith("552 5.3.4")
    assert one(b"abc\r\n" * 10 + b".\r\n", limit=50)[0] == (b"abc\r\n" * 10, None, False)
    assert one(b"abc\r\n")[0] == "ClientEOF"


def test_stream_reader_internals():
    """read_data works on these StreamReader attributes (CPython's asyncio.streams)."""

    async def main():
        r = asyncio.StreamReader(limit=10)
        assert isinstance(r._buffer, bytearray)
        assert r._eof is False and r._exception is None
        assert callable(r._wait_for_data) and callable(r._maybe_resume_transport)

    asyncio.run(main())


@pytest.mark.parametrize("fn", [read_data, line_reader], ids=["read_data", "reference"])
def test_a_pause_inside_an_overlong_line_does_not_end_data(fn):
    """An overlong line ending in "." and a pause, then CRLF and commands: the dot is the
    overlong line's last character, not a line of its own, so DATA goes on to the real
    end and the "commands" are message content (dropped with the 500), never commands."""
    hidden = b"MAIL FROM:<evil@outside.example>\r\nRCPT TO:<victim@hosted.example>\r\n"
    chunks = [
        b"Subject: x\r\n\r\n" + b"A" * (LIMIT + 50) + b".",
        b"\r\n" + hidden,
        b"more\r\n.\r\nQUIT\r\n",
    ]
    outcome, left, _ = run(fn, chunks, [True, True, True], 0, LIMIT)
    assert outcome[0] == b"" and outcome[1].startswith("500 5.5.2") and outcome[2] is False
    assert left == b"QUIT\r\n"  # what is read as the next command: only what follows the end
