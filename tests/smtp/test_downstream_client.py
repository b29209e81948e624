"""maild's own downstream SMTP client: pipelined replies paired in order, however they
arrive, and the connection given up (never reused out of step) after a timeout.

Why: maild replaced aiosmtplib to send XFORWARD and MAIL in one write (RFC 2920); a
reply paired with the wrong command would relay a message under the wrong sender.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maild.smtp import downstream
from maild.smtp.downstream import Downstream, DownstreamError


class FakeServer:
    """Answers each command line with a canned reply, written in the chunks given."""

    def __init__(self, replies: dict[bytes, bytes], *, chunk: int = 0, together: bool = False):
        self.replies = replies
        self.chunk = chunk
        self.together = together
        self.seen: list[bytes] = []
        self.writes: list[int] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake ESMTP\r\n")
        pending = b""
        while line := await reader.readline():
            if line.startswith(b"BDAT"):
                self.seen.append(line)
                self.seen.append(await reader.readexactly(int(line.split()[1])))
                writer.write(b"250 2.0.0 Ok: queued as Y\r\n")
                continue
            if line.startswith(b"DATA"):
                self.seen.append(line)
                writer.write(b"354 go\r\n")
                body = await reader.readuntil(b"\r\n.\r\n")
                self.seen.append(body)
                writer.write(b"250 2.0.0 Ok: queued as X\r\n")
                continue
            self.seen.append(line)
            key = line.split(b" ")[0].split(b":")[0].rstrip(b"\r\n").upper()
            reply = self.replies.get(key, b"250 2.0.0 Ok\r\n")
            if self.together and key == b"XFORWARD":
                pending += reply  # held back: sent with the next reply, in one segment
                continue
            data, pending = pending + reply, b""
            step = self.chunk or len(data)
            for i in range(0, len(data), step):
                writer.write(data[i : i + step])
                await writer.drain()
                await asyncio.sleep(0)
            if key == b"QUIT":
                break
        writer.close()


EHLO = b"250-fake\r\n250-PIPELINING\r\n250-XFORWARD NAME ADDR PROTO HELO\r\n250 8BITMIME\r\n"


async def _pair(server: FakeServer):
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    return srv, Downstream("127.0.0.1", port, local_hostname="maild.test", timeout=5)


@pytest.mark.parametrize("chunk, together", [(0, False), (0, True), (1, False), (7, True)])
async def test_pipelined_replies_are_paired_in_order(chunk, together):
    server = FakeServer(
        {
            b"EHLO": EHLO,
            b"XFORWARD": b"250 2.0.0 xf ok\r\n",
            b"MAIL": b"250-2.1.0 sender\r\n250 2.1.0 Ok\r\n",
        },
        chunk=chunk,
        together=together,
    )
    srv, ds = await _pair(server)
    try:
        conn, pooled = await ds.acquire()
        assert not pooled and conn.pipelining and conn.xforward == {"NAME", "ADDR", "PROTO", "HELO"}
        xf, mail = await ds.pipeline(conn, ["XFORWARD NAME=a ADDR=192.0.2.1", "MAIL FROM:<a@b>"])
        assert (xf.code, xf.text) == (250, "2.0.0 xf ok")
        assert (mail.code, mail.text) == (250, "2.1.0 sender\n2.1.0 Ok")
        rcpt = await ds.command(conn, "RCPT TO:<c@d>")
        assert rcpt.code == 250
        final = await ds.data(conn, b"Subject: x\r\n\r\n.dot\r\nbare\nend")
        assert final.code == 250 and conn.transactions == 1
        assert server.seen[-1] == b"Subject: x\r\n\r\n..dot\r\nbare\r\nend\r\n.\r\n"
        ds.release(conn, reusable=True)
        await ds.close()
    finally:
        srv.close()


async def test_timeout_closes_the_connection():
    async def silent(reader, writer):  # greets, then never answers
        writer.write(b"220 fake\r\n")
        await reader.readline()
        writer.write(EHLO)
        await reader.read()

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    ds = Downstream("127.0.0.1", srv.sockets[0].getsockname()[1], local_hostname="m", timeout=5)
    try:
        conn, _ = await ds.acquire()
        with pytest.raises(DownstreamError):
            await ds.command(conn, "MAIL FROM:<a@b>", timeout=0.2)
        await asyncio.sleep(0)
        assert not conn.is_connected
        ds.release(conn, reusable=True)
        assert ds._idle == []
    finally:
        srv.close()


async def test_control_characters_are_refused_before_sending():
    server = FakeServer({b"EHLO": EHLO})
    srv, ds = await _pair(server)
    try:
        conn, _ = await ds.acquire()
        with pytest.raises(ValueError):
            await ds.command(conn, "MAIL FROM:<a@b>\r\nRCPT TO:<x@y>")
        assert (await ds.command(conn, "NOOP")).code == 250
        ds.release(conn, reusable=False)
    finally:
        srv.close()


async def test_bdat_where_the_downstream_offers_chunking():
    ehlo = EHLO.replace(b"250 8BITMIME", b"250-8BITMIME\r\n250 CHUNKING")
    server = FakeServer({b"EHLO": ehlo})
    srv, ds = await _pair(server)
    try:
        conn, _ = await ds.acquire()
        assert conn.chunking
        assert (await ds.command(conn, "MAIL FROM:<a@b>")).code == 250
        assert (await ds.command(conn, "RCPT TO:<c@d>")).code == 250
        final = await ds.data(conn, b"Subject: x\r\n\r\n.dot\r\nend")
        assert (final.code, final.text) == (250, "2.0.0 Ok: queued as Y")
        body = b"Subject: x\r\n\r\n.dot\r\nend\r\n"  # not dot-stuffed: BDAT counts bytes
        assert server.seen[-2:] == [b"BDAT %d LAST\r\n" % len(body), body]
        assert conn.transactions == 1
        ds.release(conn, reusable=False)
    finally:
        srv.close()


@settings(deadline=None)  # a property, not a timing: the machine is shared
@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"\n."]), max_size=20))
def test_line_endings_and_dot_stuffing_are_the_substitutions(pieces):
    # the shortcuts for text with nothing to change give what the patterns give
    data = b"".join(pieces)
    assert downstream.crlf_lines(data) == downstream._LINE_ENDINGS.sub(b"\r\n", data)
    assert downstream.dot_stuffed(data) == downstream._LEADING_DOT.sub(b"..", data)
    inner = downstream._INNER_DOT.sub(b"..", data)
    assert (inner if b"\n." in data else data) == inner  # _write_rest's shortcut
