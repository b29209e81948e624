"""The downstream relay to Postfix: pooled connections, raw commands, hard deadlines.

Every exchange has a deadline below Postfix's smtpd_proxy_timeout (100 s): if maild
waited longer, the client would time out and retry while maild may still deliver,
which duplicates mail. A connection goes back to the pool only when its transaction
ended cleanly (after the final reply to DATA, or after RSET); one whose state is in doubt
is closed. XFORWARD is sent before every transaction because Postfix resets it after
each one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger("maild.downstream")

MAX_LINE = 8192                 # a reply line longer than this is a protocol error
MAX_REPLY = MAX_LINE * 4        # and so is a (multi-line) reply longer than this
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LINE_ENDINGS = re.compile(rb"(?:\r\n|\n|\r(?!\n))")
_LEADING_DOT = re.compile(rb"(?m)^\.")


class DownstreamError(Exception):
    """The downstream could not be reached or did not answer in time."""


class DownstreamRefused(DownstreamError):
    """The downstream answered, but refused the greeting or EHLO: not a usable smtpd."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str  # may hold several lines, separated by "\n"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    def smtp(self) -> str:
        """As aiosmtpd's push() sends it: multi-line replies joined with CRLF."""
        lines = self.text.split("\n") or [""]
        return "\r\n".join(
            f"{self.code}{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines))


class _Client(asyncio.Protocol):
    """One SMTP client connection: replies are parsed in order and handed to the
    commands waiting for them, first come first served, so commands can be pipelined
    (RFC 2920).

    Why not aiosmtplib: it allows one command in flight per connection (a reply that
    arrives while the previous one is not yet collected is dropped), so XFORWARD and MAIL
    would cost two round trips and two sends per message, and each command a lock, a
    wait_for and a task wake-up. On loopback every send wakes Postfix: with aiosmtplib
    the sends are a quarter of maild's CPU (bench/profile.py). Replies are parsed as
    aiosmtplib parses them; a connection is closed after a timeout, a lost connection or
    a 421; command lines holding control characters are refused; DATA content has its
    line endings normalised and is dot-stuffed.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiters: deque[asyncio.Future[Reply]] = deque()

    # ------------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # the greeting is the reply to the connection: expected before anything is sent
        self.greeting: asyncio.Future[Reply] = self.loop.create_future()
        self.waiters.append(self.greeting)

    def data_received(self, data: bytes) -> None:
        if not self.waiters:
            return  # nothing asked (an idle connection's 421, say): never paired with a later command
        self.buf += data
        while self.waiters:
            try:
                reply = self._parse()
            except DownstreamError as e:
                self._fail(e)
                return
            if reply is None:
                return
            waiter = self.waiters.popleft()
            if not waiter.done():  # a command that gave up (timeout, cancel) still owns its reply
                waiter.set_result(reply)
        self.buf.clear()  # more than was asked for

    def _parse(self) -> Reply | None:
        """One complete reply from the front of the buffer (consumed), or None."""
        buf = self.buf
        lines: list[bytes] = []
        offset = 0
        code = -1
        while True:
            end = buf.find(b"\n", offset)
            if end < 0:
                if len(buf) > MAX_REPLY:
                    raise DownstreamError("downstream reply too long")
                return None
            line = bytes(buf[offset:end + 1])
            if len(line) > MAX_LINE or offset + len(line) > MAX_REPLY:
                raise DownstreamError("downstream reply too long")
            try:
                code = int(line[:3])
            except ValueError:
                raise DownstreamError("malformed downstream reply line: "
                                      + line.decode("utf-8", "ignore").strip()) from None
            offset = end + 1
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del buf[:offset]
                return Reply(code, b"\n".join(lines).decode("utf-8", "surrogateescape"))

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost fails what still waits

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        err = DownstreamError("connection lost" + (f": {exc}" if exc else ""))
        self._fail(err)

    def _fail(self, err: Exception) -> None:
        waiters, self.waiters = self.waiters, deque()
        for w in waiters:
            if not w.done():
                w.set_exception(err)
        self.buf.clear()
        self.close()

    # ------------------------------------------------------------------ client

    @property
    def is_connected(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def send(self, data: bytes, replies: int) -> list[asyncio.Future[Reply]]:
        """Write `data` (one or more commands) and expect `replies` replies to it."""
        if not self.is_connected:
            raise DownstreamError("not connected")
        futs = [self.loop.create_future() for _ in range(replies)]
        self.waiters.extend(futs)
        self.transport.write(data)  # type: ignore[union-attr]
        return futs

    async def reply(self, fut: asyncio.Future[Reply], timeout: float | None) -> Reply:
        """The reply, within `timeout` seconds; a timeout closes the connection (the
        reply given up on could otherwise be paired with a later command)."""
        timer = None if timeout is None else self.loop.call_later(timeout, self._expire, fut)
        try:
            r = await fut
        finally:
            if timer is not None:
                timer.cancel()
        if r.code == 421:  # the server is closing the channel
            self.close()
        return r

    def _expire(self, fut: asyncio.Future[Reply]) -> None:
        if not fut.done():
            fut.set_exception(DownstreamError("timed out waiting for the downstream's reply"))
            self.close()


@dataclass
class Connection:
    client: _Client
    xforward: frozenset[str]
    created: float
    last_used: float = field(default_factory=time.monotonic)
    transactions: int = 0
    pipelining: bool = False
    chunking: bool = False
    content_sent: bool = False  # this transaction's message has been written (for the log)
    pool: Downstream | None = None  # the pool it came from: after a reload swapped pools, it goes back there

    @property
    def is_connected(self) -> bool:
        return self.client.is_connected


class Downstream:
    """A pool of SMTP connections to one downstream (Postfix's re-injection smtpd)."""

    def __init__(self, host: str, port: int, *, local_hostname: str, timeout: float = 60.0,
                 pool_size: int = 8, max_idle: float = 50.0, max_transactions: int = 1000):
        self.host = host
        self.port = port
        self.local_hostname = local_hostname
        self.timeout = timeout
        self.pool_size = pool_size
        # Postfix's smtpd drops an idle client after smtpd_timeout (300 s, or less under
        # stress); keep idle connections well below that.
        self.max_idle = max_idle
        self.max_transactions = max_transactions
        self._idle: list[Connection] = []
        self.in_use = 0

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        client = _Client(loop)
        where = f"{self.host}:{self.port}"
        try:
            await asyncio.wait_for(loop.create_connection(lambda: client, self.host, self.port),
                                   self.timeout)
        except (OSError, TimeoutError) as e:
            client.close()
            raise DownstreamError(f"cannot connect to {where}: {e or type(e).__name__}") from e
        try:
            greeting = await client.reply(client.greeting, self.timeout)
            if greeting.code != 220:
                raise DownstreamRefused(f"cannot connect to {where}: {greeting.code} {greeting.text}")
            ehlo = await client.reply(
                client.send(f"EHLO {self.local_hostname}\r\n".encode("utf-8", "surrogateescape"),
                            1)[0], self.timeout)
        except DownstreamError:
            client.close()
            raise
        if ehlo.code != 250:
            client.close()
            raise DownstreamRefused(f"{where} refused EHLO: {ehlo.code} {ehlo.text}")
        ext = esmtp_extensions(ehlo.text)
        xf = frozenset(a.upper() for a in ext["xforward"].split()) if "xforward" in ext \
            else frozenset()
        now = time.monotonic()
        return Connection(client=client, xforward=xf, created=now, last_used=now,
                          pipelining="pipelining" in ext, chunking="chunking" in ext, pool=self)

    async def probe(self) -> frozenset[str]:
        """Connect and EHLO, then QUIT: the XFORWARD attributes offered, or DownstreamError
        (DownstreamRefused when something answered but would not take mail)."""
        conn = await self._connect()
        await self._quit(conn)
        return conn.xforward

    async def acquire(self) -> tuple[Connection, bool]:
        """A connection ready for MAIL; the bool says whether it came from the pool."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.is_connected and now - conn.last_used < self.max_idle:
                self.in_use += 1
                return conn, True
            self._discard(conn)
        conn = await self._connect()
        self.in_use += 1
        return conn, False

    def release(self, conn: Connection, *, reusable: bool) -> None:
        """Give a connection back: pooled when its transaction ended cleanly."""
        if conn.pool is not None and conn.pool is not self:
            conn.pool.release(conn, reusable=reusable)
            return
        self.in_use -= 1
        conn.last_used = time.monotonic()
        if (reusable and conn.is_connected and len(self._idle) < self.pool_size
                and conn.transactions < self.max_transactions):
            self._idle.append(conn)
        else:
            self._discard(conn)

    def _discard(self, conn: Connection) -> None:
        if conn.is_connected:
            asyncio.get_running_loop().create_task(self._quit(conn))

    async def _quit(self, conn: Connection) -> None:
        try:
            await conn.client.reply(conn.client.send(b"QUIT\r\n", 1)[0], 5)
        except DownstreamError:
            pass
        finally:
            conn.client.close()

    @staticmethod
    def _line(line: str) -> bytes:
        raw = line.encode("utf-8", "surrogateescape")
        if _CONTROL.search(line):
            raise ValueError("Command arg contains a prohibited control character")
        return raw + b"\r\n"

    async def command(self, conn: Connection, line: str, timeout: float | None = None) -> Reply:
        """Send one raw command line; the caller already validated it."""
        client = conn.client
        return await client.reply(client.send(self._line(line), 1)[0], timeout or self.timeout)

    async def pipeline(self, conn: Connection, lines: list[str], timeout: float | None = None
                       ) -> list[Reply]:
        """Several commands in one write, their replies in order (RFC 2920; only where the
        downstream advertised PIPELINING, conn.pipelining). XFORWARD and MAIL this way
        cost one send and one round trip instead of two."""
        client = conn.client
        futs = client.send(b"".join(self._line(line) for line in lines), len(lines))
        out = []
        for fut in futs:
            out.append(await client.reply(fut, timeout or self.timeout))
        return out

    async def data(self, conn: Connection, message: bytes, timeout: float | None = None) -> Reply:
        """The message (line endings normalised) and the final reply: with BDAT where the
        downstream offers CHUNKING (RFC 3030: one write and one round trip, no
        dot-stuffing), else DATA, the dot-stuffed message after the 354."""
        client = conn.client
        timeout = timeout or self.timeout
        message = _LINE_ENDINGS.sub(b"\r\n", message)
        if not message.endswith(b"\r\n"):
            message += b"\r\n"
        conn.content_sent = False
        if conn.chunking:
            conn.content_sent = True
            r = await client.reply(client.send(b"BDAT %d LAST\r\n" % len(message) + message, 1)[0],
                                   timeout)
            if r.code == 250:
                conn.transactions += 1
            return r
        message = _LEADING_DOT.sub(b"..", message) + b".\r\n"
        r = await client.reply(client.send(b"DATA\r\n", 1)[0], timeout)
        if r.code != 354:
            return r
        conn.content_sent = True
        r = await client.reply(client.send(message, 1)[0], timeout)
        if r.code == 250:
            conn.transactions += 1
        return r

    async def retire(self) -> None:
        """Replaced by a new pool (reload): close the idle connections now; those in use
        finish their session's transaction and are closed when released."""
        self.pool_size = 0
        await self.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(c) for c in idle), return_exceptions=True)


def esmtp_extensions(ehlo: str) -> dict[str, str]:
    """EHLO reply text -> {keyword (lower case): parameters}, the greeting line skipped
    (as aiosmtplib parsed it, the old-style "AUTH=" form aside, which maild never uses)."""
    out: dict[str, str] = {}
    for line in ehlo.split("\n")[1:]:
        line = line.strip()
        if line:
            keyword, _, params = line.partition(" ")
            out[keyword.lower()] = params
    return out
