"""SMTP AUTH (RFC 4954) in front mode: PLAIN and LOGIN, over TLS only, checked by Dovecot.

maild holds no passwords: each login is asked of Dovecot's auth service, the socket
Postfix uses with smtpd_sasl_type = dovecot (Dovecot's client auth protocol 1.2: VERSION
and CPID, then one AUTH request per login with the PLAIN response, answered OK or FAIL).
LOGIN is collected here and asked as PLAIN, so Dovecot needs only PLAIN enabled.
Failed logins are counted per client address and per login (Postfix's anvil has no such
limit; Dovecot's auth penalty only slows one connection down): past max_failures within
the window, the client address is refused 421 and closed, and the login 535 without
asking Dovecot, so guessing one account's password from many addresses gets nowhere.
No password reaches a log line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from maild.config import Auth

DOVECOT_TIMEOUT = 10.0


class AuthUnavailable(Exception):
    """Dovecot's auth service could not answer (a 454 4.7.0: the client tries again)."""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    login: str = ""
    temporary: bool = False
    reason: str = ""


def _tab_safe(value: str) -> str:
    return value.replace("\t", " ").replace("\n", " ").replace("\r", " ")


class DovecotAuth:
    """The client side of Dovecot's auth protocol: one connection per login attempt
    (as Postfix's smtpd keeps one per process; a login is rare next to a message)."""

    _ids = itertools.count(1)

    def __init__(self, where: str, timeout: float = DOVECOT_TIMEOUT):
        self.where = where
        self.timeout = timeout

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.where.startswith("inet:"):
            host, _, port = self.where[5:].rpartition(":")
            return await asyncio.open_connection(host.strip("[]"), int(port))
        return await asyncio.open_unix_connection(self.where)

    async def check(
        self, login: str, password: str, *, client_ip: str, local_ip: str, secured: bool
    ) -> Verdict:
        try:
            return await asyncio.wait_for(
                self._check(login, password, client_ip, local_ip, secured), self.timeout
            )
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as e:
            raise AuthUnavailable(f"dovecot auth at {self.where}: {type(e).__name__}: {e}") from e

    async def _check(
        self, login: str, password: str, client_ip: str, local_ip: str, secured: bool
    ) -> Verdict:
        reader, writer = await self._open()
        try:
            writer.write(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
            mechs: set[str] = set()
            while True:
                line = (await reader.readuntil(b"\n")).decode("utf-8", "replace").rstrip("\n")
                fields = line.split("\t")
                if fields[0] == "VERSION" and fields[1:2] != ["1"]:
                    raise ValueError(f"auth protocol version {fields[1:2]} (1 expected)")
                if fields[0] == "MECH" and len(fields) > 1:
                    mechs.add(fields[1].upper())
                if fields[0] == "DONE":
                    break
            if "PLAIN" not in mechs:
                raise ValueError("PLAIN is not among Dovecot's auth_mechanisms")
            rid = next(self._ids)
            resp = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
            params = ["service=smtp", f"rip={_tab_safe(client_ip)}", f"lip={_tab_safe(local_ip)}"]
            if secured:
                params.append("secured")
            writer.write(f"AUTH\t{rid}\tPLAIN\t{chr(9).join(params)}\tresp={resp}\n".encode())
            await writer.drain()
            while True:
                line = (await reader.readuntil(b"\n")).decode("utf-8", "replace").rstrip("\n")
                fields = line.split("\t")
                if len(fields) < 2 or fields[1] != str(rid):
                    continue
                args = dict(f.partition("=")[::2] for f in fields[2:])
                if fields[0] == "OK":
                    return Verdict(True, args.get("user") or login)
                if fields[0] == "FAIL":
                    return Verdict(
                        False,
                        args.get("user") or login,
                        temporary="temp" in args,
                        reason=args.get("reason", ""),
                    )
                if fields[0] == "CONT":  # PLAIN needs no second round
                    raise ValueError("unexpected CONT to a PLAIN request")
        finally:
            writer.close()


class Failures:
    """Failed logins per client address and per login within a sliding window."""

    def __init__(self, settings: Auth, clock=time.monotonic):  # type: ignore[no-untyped-def]
        self.settings = settings
        self.clock = clock
        self._seen: dict[str, deque[float]] = {}
        # With [server] workers > 1: tells the other workers, so the limit is the host's.
        self.on_failure: Callable[[str, str], None] | None = None

    def _recent(self, key: str) -> int:
        q = self._seen.get(key)
        if q is None:
            return 0
        cutoff = self.clock() - self.settings.failure_window
        while q and q[0] <= cutoff:
            q.popleft()
        if not q:
            del self._seen[key]
        return len(q)

    def blocked(self, *, addr: str = "", login: str = "") -> bool:
        limit = self.settings.max_failures
        return (bool(addr) and self._recent("ip:" + addr) >= limit) or (
            bool(login) and self._recent("login:" + login.casefold()) >= limit
        )

    def failed(self, addr: str, login: str) -> None:
        self.record(addr, login)
        if self.on_failure is not None:
            self.on_failure(addr, login)

    def record(self, addr: str, login: str) -> None:
        """A failure, here or (with workers) in another process of this maild."""
        now = self.clock()
        for key in ("ip:" + addr, "login:" + login.casefold()):
            self._seen.setdefault(key, deque()).append(now)
        if len(self._seen) > 100_000:  # a spray of logins: forget the quiet ones first
            for key in list(self._seen)[:50_000]:
                self._recent(key)


def b64decode(text: str) -> str | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None


def parse_plain(text: str) -> tuple[str, str] | None:
    """RFC 4616 authzid NUL authcid NUL passwd: (login, password), or None. An authzid
    other than the login is refused: maild lets nobody act as another user."""
    decoded = b64decode(text)
    if decoded is None or decoded.count("\0") != 2:
        return None
    authzid, authcid, password = decoded.split("\0")
    if not authcid or not password or (authzid and authzid != authcid):
        return None
    return authcid, password
