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
import contextlib
import logging
import time
from dataclasses import dataclass, field

import aiosmtplib

log = logging.getLogger("maild.downstream")

XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")


class DownstreamError(Exception):
    """The downstream could not be reached or did not answer in time."""


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


@dataclass
class Connection:
    smtp: aiosmtplib.SMTP
    xforward: frozenset[str]
    created: float
    last_used: float = field(default_factory=time.monotonic)
    transactions: int = 0

    @property
    def is_connected(self) -> bool:
        return self.smtp.is_connected


def xtext(value: str) -> str:
    """RFC 3461 xtext: '+', '=' and characters outside '!'..'~' as +HH."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}"
                   for c in value.encode("utf-8", "surrogateescape").decode("latin-1"))


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
        smtp = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=self.timeout,
                               local_hostname=self.local_hostname, start_tls=False,
                               use_tls=False)
        try:
            await smtp.connect()
            code, text = await self._ehlo(smtp)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            with contextlib.suppress(Exception):
                smtp.close()
            raise DownstreamError(f"cannot connect to {self.host}:{self.port}: {e}") from e
        if code != 250:
            smtp.close()
            raise DownstreamError(f"{self.host}:{self.port} refused EHLO: {code} {text}")
        attrs = smtp.esmtp_extensions.get("xforward", "")
        xf = frozenset(a.upper() for a in attrs.split()) if "xforward" in smtp.esmtp_extensions \
            else frozenset()
        now = time.monotonic()
        return Connection(smtp=smtp, xforward=xf, created=now, last_used=now)

    @staticmethod
    async def _ehlo(smtp: aiosmtplib.SMTP) -> tuple[int, str]:
        r = await smtp.ehlo()
        return r.code, r.message

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
            await asyncio.wait_for(conn.smtp.quit(), 5)
        except Exception:
            with contextlib.suppress(Exception):
                conn.smtp.close()

    async def command(self, conn: Connection, line: str, timeout: float | None = None) -> Reply:
        """Send one raw command line; the caller already validated it."""
        try:
            r = await conn.smtp.execute_command(
                line.encode("utf-8", "surrogateescape"), timeout=timeout or self.timeout)
        except aiosmtplib.SMTPResponseException as e:
            return Reply(e.code, e.message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            raise DownstreamError(str(e) or type(e).__name__) from e
        return Reply(r.code, r.message)

    async def data(self, conn: Connection, message: bytes, timeout: float | None = None) -> Reply:
        """DATA, the message (dot-stuffed by aiosmtplib), and the final reply."""
        try:
            r = await conn.smtp.data(message, timeout=timeout or self.timeout)
        except aiosmtplib.SMTPResponseException as e:
            return Reply(e.code, e.message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            raise DownstreamError(str(e) or type(e).__name__) from e
        conn.transactions += 1
        return Reply(r.code, r.message)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(c) for c in idle), return_exceptions=True)
