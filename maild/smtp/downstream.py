"""The downstream relay to Postfix: pooled connections, raw commands, hard deadlines.

Every exchange has a deadline below Postfix's smtpd_proxy_timeout (100 s): if maild
waited longer, the client would time out and retry while maild may still deliver,
which duplicates mail. A connection goes back to the pool only when its transaction
ended cleanly (after the final reply to DATA, or after RSET); one whose state is in doubt
is closed. XFORWARD is sent before every transaction because Postfix resets it after
each one.

The pool is capped below Postfix's process limit (each connection holds one re-injection
smtpd process): `[server.limits] downstream_connections` in all (idle pooled ones
included), `downstream_connections_per_client` per stranger (a real client outside customers'
networks), and
`downstream_reserved` of them for customers and postmaster mail. A request past a cap,
and a downstream that gives no greeting within `downstream_greeting_timeout` (Postfix
out of smtpd processes: the kernel accepts the connection and nobody answers), fail at
once with DownstreamBusy, whose reply (451 4.4.5 with the reason) the client hears within
a second or two instead of after a 20 s stall.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

log = logging.getLogger("maild.downstream")

MAX_LINE = 8192  # a reply line longer than this is a protocol error
MAX_REPLY = MAX_LINE * 4  # and so is a (multi-line) reply longer than this
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LINE_ENDINGS = re.compile(rb"(?:\r\n|\n|\r(?!\n))")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_INNER_DOT = re.compile(rb"(?<=\n)\.")  # a dot starting a line, not at the block's start


class DownstreamError(Exception):
    """The downstream could not be reached or did not answer in time."""


class DownstreamRefused(DownstreamError):
    """The downstream answered, but refused the greeting or EHLO: not a usable smtpd."""


class DownstreamBusy(DownstreamError):
    """No downstream connection for this transaction now: a cap is reached, or Postfix
    has no free smtpd process. `reply` is what the client hears; `rule` names the cap."""

    def __init__(self, reason: str, rule: str):
        super().__init__(reason)
        self.rule = rule
        self.reply = f"451 4.4.5 {reason}; try again later"


BUSY_POOL = "Too many messages in transit to our mail server right now"


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
            f"{self.code}{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines)
        )


def crlf_lines(data: bytes) -> bytes:
    """Every line ending as CRLF. Three counts tell that there is no bare CR or LF (each
    CRLF counts once in all three): the common case, without a substitution pass."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") == crlf == data.count(b"\r"):
        return data
    return _LINE_ENDINGS.sub(b"\r\n", data)


def dot_stuffed(data: bytes) -> bytes:
    """A dot that starts a line doubled (RFC 5321 4.5.2); as it is when there is none."""
    if data[:1] != b"." and b"\n." not in data:
        return data
    return _LEADING_DOT.sub(b"..", data)


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
        self._writable: asyncio.Future[None] | None = None  # set while writing is paused

    # ------------------------------------------------------------------ protocol

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        w, self._writable = self._writable, None
        if w is not None and not w.done():
            w.set_result(None)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark, so a big
        message is relayed a block at a time, not buffered whole in RAM."""
        if self._writable is not None:
            await self._writable
        if not self.is_connected:
            raise DownstreamError("connection lost")

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
            line = bytes(buf[offset : end + 1])
            if len(line) > MAX_LINE or offset + len(line) > MAX_REPLY:
                raise DownstreamError("downstream reply too long")
            try:
                code = int(line[:3])
            except ValueError:
                raise DownstreamError(
                    "malformed downstream reply line: " + line.decode("utf-8", "ignore").strip()
                ) from None
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
        self.resume_writing()  # a drain() waiting sees the loss

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

    def write(self, data: bytes) -> None:
        """Part of a message whose reply send() already expects."""
        if not self.is_connected:
            raise DownstreamError("connection lost")
        self.transport.write(data)  # type: ignore[union-attr]

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
    pool: Downstream | None = (
        None  # the pool it came from: after a reload swapped pools, it goes back there
    )
    holder: str = ""  # the real client whose transaction holds it (the per-client cap)
    reserved: bool = True  # counted in the reserved share (customers, postmaster, maild)

    @property
    def is_connected(self) -> bool:
        return self.client.is_connected


class Downstream:
    """A pool of SMTP connections to one downstream (Postfix's re-injection smtpd)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        local_hostname: str,
        timeout: float = 60.0,
        pool_size: int = 8,
        max_idle: float = 50.0,
        max_transactions: int = 1000,
        max_connections: int = 0,
        max_per_client: int = 0,
        reserved: int = 0,
        greeting_timeout: float | None = None,
    ):
        self.host = host
        self.port = port
        self.local_hostname = local_hostname
        self.timeout = timeout
        self.pool_size = pool_size
        self.max_connections = max_connections  # 0: no cap (the CLI's one-off connections)
        self.max_per_client = max_per_client
        self.reserved = reserved
        self.greeting_timeout = greeting_timeout or timeout
        self.per_client: dict[str, int] = {}
        self.strangers_in_use = 0
        self.busy = 0  # DownstreamBusy raised since start
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
            await asyncio.wait_for(
                loop.create_connection(lambda: client, self.host, self.port), self.greeting_timeout
            )
        except TimeoutError:
            client.close()
            # No SYN-ACK in time: the listen queue is full, which on loopback means the
            # service's processes are all busy (its master no longer accepts).
            raise DownstreamBusy(
                f"Our mail server has no free process (no answer from it within "
                f"{self.greeting_timeout:g}s)",
                "downstream-busy",
            ) from None
        except OSError as e:
            client.close()
            raise DownstreamError(f"cannot connect to {where}: {e}") from e
        try:
            try:
                greeting = await client.reply(client.greeting, self.greeting_timeout)
            except DownstreamError as e:
                if client.is_connected or "timed out" not in str(e):
                    raise
                # Connected, and no greeting: Postfix's master accepts no more clients
                # for the service (its process limit), the kernel's backlog holds them.
                raise DownstreamBusy(
                    f"Our mail server has no free process (no greeting from it within "
                    f"{self.greeting_timeout:g}s)",
                    "downstream-busy",
                ) from None
            if greeting.code != 220:
                raise DownstreamRefused(
                    f"cannot connect to {where}: {greeting.code} {greeting.text}"
                )
            ehlo = await client.reply(
                client.send(
                    f"EHLO {self.local_hostname}\r\n".encode("utf-8", "surrogateescape"), 1
                )[0],
                self.timeout,
            )
        except DownstreamError:
            client.close()
            raise
        if ehlo.code != 250:
            client.close()
            raise DownstreamRefused(f"{where} refused EHLO: {ehlo.code} {ehlo.text}")
        ext = esmtp_extensions(ehlo.text)
        xf = (
            frozenset(a.upper() for a in ext["xforward"].split())
            if "xforward" in ext
            else frozenset()
        )
        now = time.monotonic()
        return Connection(
            client=client,
            xforward=xf,
            created=now,
            last_used=now,
            pipelining="pipelining" in ext,
            chunking="chunking" in ext,
            pool=self,
        )

    async def probe(self) -> frozenset[str]:
        """Connect and EHLO, then QUIT: the XFORWARD attributes offered, or DownstreamError
        (DownstreamRefused when something answered but would not take mail)."""
        conn = await self._connect()
        await self._quit(conn)
        return conn.xforward

    def check(self, holder: str = "", *, reserved: bool = True) -> None:
        """Raise DownstreamBusy if a connection for `holder` would pass a cap."""
        if not self.max_connections:
            return
        # Per client for strangers: a customer's MTA may hold many connections (Postfix's
        # default concurrency to one destination is 20); [ratelimit] bounds customers.
        if (
            holder
            and not reserved
            and self.max_per_client
            and self.per_client.get(holder, 0) >= self.max_per_client
        ):
            self.busy += 1
            raise DownstreamBusy(
                f"Too many messages in transit from {holder} at once (limit {self.max_per_client})",
                "downstream-per-client",
            )
        if self.in_use >= self.max_connections or (
            not reserved and self.strangers_in_use >= self.max_connections - self.reserved
        ):
            self.busy += 1
            raise DownstreamBusy(BUSY_POOL, "downstream-connections")

    async def acquire(self, holder: str = "", *, reserved: bool = True) -> tuple[Connection, bool]:
        """A connection ready for MAIL; the bool says whether it came from the pool.

        `holder` is the real client (per-client cap); `reserved` says whether the
        transaction may use the reserved share (a customer's, postmaster mail, maild's own).
        DownstreamBusy at once past a cap: nothing waits for a free connection.
        """
        self.check(holder, reserved=reserved)
        self._take(holder, reserved)
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.is_connected and now - conn.last_used < self.max_idle:
                conn.holder, conn.reserved = holder, reserved
                return conn, True
            self._discard(conn)
        try:
            conn = await self._connect()
        except BaseException:
            self._give_back(holder, reserved)
            raise
        conn.holder, conn.reserved = holder, reserved
        return conn, False

    def _take(self, holder: str, reserved: bool) -> None:
        # Counted from before the connection is made: concurrent acquires see each other.
        self.in_use += 1
        if not reserved:
            self.strangers_in_use += 1
        if holder:
            self.per_client[holder] = self.per_client.get(holder, 0) + 1

    def _give_back(self, holder: str, reserved: bool) -> None:
        self.in_use -= 1
        if not reserved:
            self.strangers_in_use -= 1
        if holder:
            n = self.per_client.get(holder, 0) - 1
            if n > 0:
                self.per_client[holder] = n
            else:
                self.per_client.pop(holder, None)

    def release(self, conn: Connection, *, reusable: bool) -> None:
        """Give a connection back: pooled when its transaction ended cleanly."""
        if conn.pool is not None and conn.pool is not self:
            conn.pool.release(conn, reusable=reusable)
            return
        self._give_back(conn.holder, conn.reserved)
        conn.holder, conn.reserved = "", True
        conn.last_used = time.monotonic()
        # Idle pooled connections hold smtpd processes too: within the cap.
        if self.max_connections and self.in_use + len(self._idle) >= self.max_connections:
            reusable = False
        if (
            reusable
            and conn.is_connected
            and len(self._idle) < self.pool_size
            and conn.transactions < self.max_transactions
        ):
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

    async def pipeline(
        self, conn: Connection, lines: list[str], timeout: float | None = None
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

    async def data(
        self,
        conn: Connection,
        message: bytes,
        timeout: float | None = None,
        *,
        rest: Iterable[bytes] = (),
        rest_size: int = 0,
    ) -> Reply:
        """The message (line endings normalised) and the final reply: with BDAT where the
        downstream offers CHUNKING (RFC 3030: one write and one round trip, no
        dot-stuffing), else DATA, the dot-stuffed message after the 354.

        `rest` (`rest_size` bytes in blocks, already CRLF lines as maild's DATA reader
        leaves them: a spooled message's body) follows `message`, written a block at a
        time as the downstream takes it.
        """
        client = conn.client
        timeout = timeout or self.timeout
        message = crlf_lines(message)
        if not message.endswith(b"\r\n") and not rest_size:
            message += b"\r\n"
        conn.content_sent = False
        if conn.chunking:
            conn.content_sent = True
            fut = client.send(b"BDAT %d LAST\r\n" % (len(message) + rest_size) + message, 1)[0]
            await self._write_rest(client, fut, rest, stuff=False)
            r = await client.reply(fut, timeout)
            if r.code == 250:
                conn.transactions += 1
            return r
        message = dot_stuffed(message)
        r = await client.reply(client.send(b"DATA\r\n", 1)[0], timeout)
        if r.code != 354:
            return r
        conn.content_sent = True
        if not rest_size:
            fut = client.send(message + b".\r\n", 1)[0]
        else:
            fut = client.send(message, 1)[0]
            await self._write_rest(client, fut, rest, stuff=True)
            client.write(b".\r\n")
        r = await client.reply(fut, timeout)
        if r.code == 250:
            conn.transactions += 1
        return r

    @staticmethod
    async def _write_rest(
        client: _Client, fut: asyncio.Future[Reply], rest: Iterable[bytes], *, stuff: bool
    ) -> None:
        """Write the blocks of `rest` (dot-stuffed for DATA), waiting for the transport
        to drain between them; stop early if the downstream already replied (a refusal,
        a lost connection)."""
        at_line_start = True
        for block in rest:
            if fut.done():  # the rest unsent: the connection cannot carry another message
                client.close()
                return
            if stuff and block:
                out = _INNER_DOT.sub(b"..", block) if b"\n." in block else block
                if at_line_start and out[:1] == b".":
                    out = b"." + out
                at_line_start = block.endswith(b"\n")
                block = out
            client.write(block)
            await client.drain()

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
