"""The DATA reader: the message up to CRLF.CRLF, read with SMTP smuggling in mind.

aiosmtpd passes bare LF and bare CR inside data untouched, and Postfix's own
smtpd_forbid_bare_newline exempts $mynetworks, so the re-injection smtpd would take
`\\n.\\n` as end of data. A bare CR or LF (550 5.5.2) or a NUL (550 5.6.0) refuses the
message and ends the session: nothing after such a byte can reach the downstream.
Size and line-length violations read on to the end of data, then refuse (RFC 5321 4.2.5).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum
from typing import Any


class ClientEOF(asyncio.CancelledError):
    """The client half-closed and every complete command it sent has been answered.

    A CancelledError, so aiosmtpd's loop ends the session as it does on a reset.
    """


class AbortKind(Enum):
    """Why DATA was refused while it was read; the decision log's rule for it."""

    SIZE = "size"
    LINE_LENGTH = "line-length"
    BARE_LINE_ENDING = "bare-line-ending"
    NUL = "nul"
    MEMORY = "memory"  # the message could not be held (maild.smtp.budget): 452 4.3.1

    @property
    def rule(self) -> str:
        return "smuggling" if self.fatal else "limits"

    @property
    def fatal(self) -> bool:
        """The client's idea of where the message ends may differ from ours: the rest of
        its bytes could be read as commands (a smuggled transaction)."""
        return self in (AbortKind.BARE_LINE_ENDING, AbortKind.NUL)


@dataclass(frozen=True, slots=True)
class Abort:
    kind: AbortKind
    reply: str


_BARE = Abort(
    AbortKind.BARE_LINE_ENDING,
    "550 5.5.2 Message refused: bare <LF> or <CR> received (RFC 5321 2.3.8); "
    "send lines ending in CRLF",
)
_NUL = Abort(AbortKind.NUL, "550 5.6.0 Message refused: NUL character in message data")


def _too_big(limit: int) -> Abort:
    return Abort(AbortKind.SIZE, f"552 5.3.4 Message size exceeds fixed limit ({limit} bytes)")


async def read_data(
    reader: asyncio.StreamReader, limit: int, max_line: int, out: Any = None
) -> tuple[bytes, Abort | None]:
    """DATA from `reader` up to and including CRLF.CRLF: (content, None), or (content
    dropped, why the message is refused).

    `out`, when given, receives the content instead (anything with bytearray's extend,
    clear and len: maild.smtp.budget.Sink), and the content returned is empty.

    `max_line` is the longest line text allowed: RFC 5321 4.5.3.1.6 counts 1000 octets
    with the CRLF and without the leading dot a client doubles for transparency, so
    line_length = 998 takes 998 characters, or 999 on the wire when the first is a dot.

    It decides exactly what reading one line at a time with readuntil(b"\\r\\n") on a
    StreamReader whose limit is `max_line` + 1 would decide (tests/smtp/test_data_reader.py
    keeps that reader and compares the two), but works on the StreamReader's own buffer
    a block at a time: for the run of complete lines buffered, the end line and the
    stuffed dots are found with find(b"\\r\\n."), and the bare CR/LF check (counts of
    CR, LF and CRLF agree), the NUL check and the line-length check (every window of
    max_line + 2 bytes holds an LF, so a stuffed line of max_line + 1 takes the slow
    path) are a few bytes methods. A run that fails a check is read one line at a time,
    so that the first offending line decides:

    - a line is the bytes up to the first CRLF; longer than `max_line` before its CRLF
      (`max_line` + 1 if it starts with a dot), it is skipped unchecked (500, content
      dropped, reading goes on), however its bytes arrive: a partial line that already
      holds more than that and a byte (its CR, perhaps) without a CRLF is dropped up to
      its CRLF, whatever comes in between;
    - a bare CR or LF in a line: 550 5.5.2, fatal (BARE_LINE_ENDING); else a NUL:
      550 5.6.0, fatal (NUL);
    - ".\\r\\n" ends the data; a leading dot is removed; past `limit` bytes: 552, content
      dropped, reading goes on;
    - EOF before the end: ClientEOF (the buffer cleared, as readuntil's
      IncompleteReadError clears it).

    Bytes after the end line (or after a fatal line) stay in the reader's buffer.
    """
    buf: bytearray = reader._buffer  # type: ignore[attr-defined]
    if reader._exception is not None:  # type: ignore[attr-defined]
        raise reader._exception  # type: ignore[attr-defined]
    own = out is None
    if own:
        out = bytearray()
    problem: Abort | None = None
    window = max_line + 2  # an unstuffed line's LF lies within this many bytes of its start
    pos = 0  # start of the current line in buf
    skipping = False  # inside an overlong line: everything up to its CRLF is dropped
    while True:
        if skipping:
            p = buf.find(b"\r\n", pos)
            if p >= 0:
                pos, skipping = p + 2, False
            else:
                pos = max(pos, len(buf) - 1)  # a trailing CR may pair with the next LF
        while not skipping:  # the complete lines in buf[pos:]
            if buf.startswith(b".\r\n", pos):
                del buf[: pos + 3]
                reader._maybe_resume_transport()  # type: ignore[attr-defined]
                return (bytes(out) if own else b""), problem
            last = buf.rfind(b"\r\n", pos)
            if last < 0:
                break
            last += 2  # the complete lines are buf[pos:last]
            end = last  # the end line's start, if it is in there
            dots = [pos] if buf[pos] == 46 else []  # the stuffed dots in buf[pos:end]
            i = buf.find(b"\r\n.", pos, last)
            while i >= 0:
                if buf.startswith(b"\r\n", i + 3):
                    end = i + 2
                    break
                dots.append(i + 2)
                i = buf.find(b"\r\n.", i + 3, last)
            if _clean(buf, pos, end, window):
                if problem is None:
                    for d in dots:
                        out.extend(buf[pos:d])
                        pos = d + 1
                    out.extend(buf[pos:end])
                    if limit and len(out) > limit:
                        problem = _too_big(limit)
                        out.clear()
                pos = end
                if end == last:
                    break
                continue
            while pos < end:  # one line at a time: the first offending line decides
                p = buf.find(b"\r\n", pos)
                if p - pos > max_line + (buf[pos] == 46):
                    problem = problem or _long_reply(max_line)
                    out.clear()
                    pos = p + 2
                    continue
                if buf.find(b"\n", pos, p) >= 0 or buf.find(b"\r", pos, p) >= 0:
                    del buf[: p + 2]
                    reader._maybe_resume_transport()  # type: ignore[attr-defined]
                    return b"", _BARE
                if buf.find(b"\x00", pos, p) >= 0:
                    del buf[: p + 2]
                    reader._maybe_resume_transport()  # type: ignore[attr-defined]
                    return b"", _NUL
                if problem is None:
                    out.extend(buf[pos + 1 if buf[pos] == 46 else pos : p + 2])
                    if limit and len(out) > limit:
                        problem = _too_big(limit)
                        out.clear()
                pos = p + 2
        # buf[pos:] is a partial line (no CRLF)
        if not skipping and len(buf) - pos - 1 > max_line + (buf[pos : pos + 1] == b"."):
            # An overlong line: the rest of it, up to its CRLF, is never read as lines
            # (a dot or a command after a pause must not end DATA where the client's
            # line does not end: that would be a smuggling vector).
            problem = problem or _long_reply(max_line)
            out.clear()
            skipping = True
            pos = len(buf) - 1
        if reader._eof:  # type: ignore[attr-defined]
            buf.clear()
            raise ClientEOF()  # the message is incomplete: nothing relayed
        del buf[:pos]
        pos = 0
        reader._maybe_resume_transport()  # type: ignore[attr-defined]
        await reader._wait_for_data("readuntil")  # type: ignore[attr-defined]


def _long_reply(max_line: int) -> Abort:
    return Abort(
        AbortKind.LINE_LENGTH,
        f"500 5.5.2 Message line longer than {max_line} characters "
        "(RFC 5321 4.5.3.1.6); wrap long lines or use quoted-printable",
    )


def _clean(buf: bytearray, start: int, end: int, window: int) -> bool:
    """buf[start:end] (whole lines) holds no bare CR or LF, no NUL, no overlong line."""
    lines = buf.count(b"\r\n", start, end)
    if buf.count(b"\n", start, end) != lines or buf.count(b"\r", start, end) != lines:
        return False
    if buf.find(b"\x00", start, end) >= 0:
        return False
    while end - start > window:
        start = buf.rfind(b"\n", start, start + window) + 1
        if not start:
            return False
    return True
