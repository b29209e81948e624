"""What front mode needs to face the internet: STARTTLS and implicit TLS (RFC 3207, RFC
8314), SMTP AUTH over TLS (maild.smtp.sasl), the PROXY protocol from trusted load
balancers (maild.smtp.proxyproto).

`Front` is the daemon-wide part (the TLS context, reloaded in place on SIGHUP; the Dovecot
client; the failed-login counts), `FrontSMTP` the per-session commands, mixed into
maild.smtp.server.MaildSMTP. A listener is one of:
- "smtp" ([server] listen): STARTTLS offered, required only with security_level = "encrypt";
- "submission" ([server.tls] submission, port 587): STARTTLS required before anything else;
- "implicit" ([server.tls] implicit, port 465): TLS from the first byte.
Without [server.tls] none of this is on: STARTTLS is 502 and AUTH 503, and HELP lists neither.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto
import functools
import logging
import os
import re
import ssl
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, syntax

from maild.config import TLS, Server
from maild.netaddr import is_trusted
from maild.smtp import proxyproto
from maild.smtp.sasl import AuthUnavailable, DovecotAuth, Failures, b64decode, parse_plain
from maild.smtp.tls import build_context, certificate_summary, describe, reload_context

if TYPE_CHECKING:
    from maild.smtp.server import MaildSession

log = logging.getLogger("maild.smtp")

LISTENERS = ("smtp", "submission", "implicit")
_UNSAFE = re.compile(r"[^\x21-\x7e]")


def _hostports(addrs: tuple[tuple[str, int], ...]) -> list[str]:
    return [f"{h}:{p}" for h, p in addrs]


def shown_login(login: str) -> str:
    """A login as a log line may carry it: printable, no spaces, at most 64 characters."""
    return _UNSAFE.sub("?", login)[:64] or "-"


class Front:
    """The daemon's TLS context, Dovecot client and failed-login counts."""

    def __init__(self, server: Server):
        self.settings = server
        self.context: ssl.SSLContext | None = (
            build_context(server.tls) if server.tls.enabled else None
        )
        self.auth = DovecotAuth(server.auth.dovecot) if server.auth.enabled else None
        self.failures = Failures(server.auth)
        self.certificate = certificate_summary(server.tls) if server.tls.enabled else {}

    def reload(self, server: Server) -> None:
        """New [server.tls] and [server.auth] for new sessions; TLSConfigError keeps the
        running certificate. Sessions in flight keep theirs."""
        if server.tls.enabled:
            if self.context is None:
                self.context = build_context(server.tls)
            else:
                reload_context(self.context, server.tls)
        else:
            self.context = None
        self.settings = server
        self.auth = DovecotAuth(server.auth.dovecot) if server.auth.enabled else None
        self.failures.settings = server.auth
        self.certificate = certificate_summary(server.tls) if server.tls.enabled else {}

    def status(self) -> dict[str, Any]:
        tls, auth = self.settings.tls, self.settings.auth
        return {
            "tls": (
                {
                    **self.certificate,
                    "implicit": _hostports(tls.implicit),
                    "submission": _hostports(tls.submission),
                    "security_level": tls.security_level,
                    "customers": tls.customers,
                    "min_protocol": tls.min_protocol,
                }
                if tls.enabled
                else None
            ),
            "auth": {"dovecot": auth.dovecot} if auth.enabled else None,
            "trusted_proxies": [str(n) for n in self.settings.trusted_proxies],
        }


class BindError(OSError):
    """A listener that cannot be bound, named as policies.toml names it."""

    def __init__(self, key: str, addr: tuple[str, int], err: OSError):
        host, port = addr
        # asyncio's own strerror repeats the address: the system's text for the errno
        why = os.strerror(err.errno) if err.errno else str(err)
        if port < 1024 and os.geteuid() != 0:
            why += " (a port below 1024 needs root or CAP_NET_BIND_SERVICE)"
        super().__init__(err.errno, f"cannot listen on {host or '*'}:{port} ({key}): {why}")


def tls_listeners(tls: TLS) -> list[tuple[str, str, tuple[str, int]]]:
    """(kind, policies.toml key, address) of every [server.tls] implicit and submission
    listener."""
    return [
        (kind, f"[server.tls] {kind}", addr)
        for kind, addrs in (("implicit", tls.implicit), ("submission", tls.submission))
        for addr in addrs
    ]


async def bind(
    key: str, addr: tuple[str, int], protocol: Callable[[], asyncio.Protocol]
) -> asyncio.AbstractServer:
    """One listener, bound and not yet serving; BindError names it as `key`."""
    host, port = addr
    try:
        return await asyncio.get_running_loop().create_server(
            protocol,
            host=host or None,
            port=port,
            reuse_address=True,
            backlog=1024,
            start_serving=False,
        )
    except OSError as e:
        raise BindError(key, addr, e) from None


async def bind_listeners(
    tls: TLS, protocol: Callable[[str], asyncio.Protocol]
) -> list[asyncio.AbstractServer]:
    """The [server.tls] implicit and submission listeners, bound (not yet serving)."""
    servers: list[asyncio.AbstractServer] = []
    try:
        for kind, key, addr in tls_listeners(tls):
            servers.append(await bind(key, addr, functools.partial(protocol, kind)))
    except BindError:
        for s in servers:
            s.close()
        raise
    return servers


def listeners_changed(file: TLS, running: TLS) -> list[dict[str, str]]:
    """The TLS listener lists the file changed, for the daemon's restart_needed."""
    out = []
    for key in ("implicit", "submission"):
        new, old = getattr(file, key), getattr(running, key)
        if new != old:
            out.append(
                {
                    "key": f"tls.{key}",
                    "file": ", ".join(_hostports(new)),
                    "running": ", ".join(_hostports(old)),
                    "why": "TLS listeners are bound once, at start",
                }
            )
    return out


class FrontSMTP(SMTP):
    """STARTTLS, implicit TLS, AUTH and PROXY for MaildSMTP (which sets front/listener)."""

    front: Front | None
    listener: str
    needs_preamble: bool
    session: MaildSession | None

    def setup_front(self, front: Front | None, listener: str) -> None:
        self.front = front
        self.listener = listener
        self.tls_context = front.context if front is not None else None
        # a PROXY header to read or a handshake to make before the greeting
        self.needs_preamble = listener == "implicit" or bool(
            front is not None and front.settings.trusted_proxies
        )
        if self.tls_context is not None:
            tls = front.settings.tls  # type: ignore[union-attr]
            self.require_starttls = listener == "submission" or tls.security_level == "encrypt"

    @property
    def encrypted(self) -> bool:
        return self._tls_protocol is not None

    @property
    def auth_enabled(self) -> bool:
        """AUTH is listed in HELP and accepted (over TLS) when Dovecot is configured."""
        return self.front is not None and self.front.auth is not None and bool(self.tls_context)

    def _call_handler_hook(self, command: str, *args: Any) -> Coroutine[Any, Any, Any]:
        """aiosmtpd's EHLO lines reach the handler with AUTH as maild offers it: over TLS
        only, PLAIN and LOGIN (aiosmtpd would list its own mechanisms after STARTTLS).
        Not a coroutine itself: no extra frame on every hook of every message."""
        if command == "EHLO":
            lines = [r for r in args[1] if not r[4:].startswith("AUTH")]
            if self.auth_enabled and self.encrypted:
                lines.insert(len(lines) - 1, "250-AUTH PLAIN LOGIN")
            args = (args[0], lines)
        return super()._call_handler_hook(command, *args)

    # ------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """aiosmtpd starts a new session after the TLS handshake (RFC 3207 4.2: forget
        what the client said); the connection's own state (id, real client, session
        slot, PROXY address) goes on."""
        old = self.session if self._original_transport is not None else None
        super().connection_made(transport)
        if old is None or self.session is None:
            return
        new = self.session
        new.id, new.peer, new.client, new.slot, new.counted = (
            old.id,
            old.peer,
            old.client,
            old.slot,
            old.counted,
        )
        new.client.helo = ""
        new.tls = describe(transport.get_extra_info("ssl_object"))
        inner = getattr(self._reader, "_reader", None)  # maild's strict reader wraps it
        if inner is not None:
            inner._transport = transport

    async def _start_tls(self) -> bool:
        """Wrap the connection in TLS (what aiosmtpd's STARTTLS does); False, logged and
        closed, when the handshake fails. Bytes the client sent before its handshake are
        discarded by aiosmtpd's connection_made: no plaintext command runs inside TLS."""
        assert self.tls_context is not None
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(
            self.loop, self, self.tls_context, waiter, server_side=True
        )
        self._original_transport = self.transport
        assert self._original_transport is not None
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except (OSError, ssl.SSLError, EOFError) as e:
            session = self.session
            peer = session.peer if session and isinstance(session.peer, tuple) else ("?", 0)
            client = (
                session.client.label if session and session.client.addr else f"unknown[{peer[0]}]"
            )
            log.info(
                "%s: TLS handshake failed: client=%s: %s",
                session.id if session else "-",
                client,
                getattr(e, "reason", None) or type(e).__name__,
            )
            self._original_transport.close()
            return False
        return True

    async def front_preamble(self) -> bool:
        """Before the greeting: the PROXY header from a trusted load balancer, then the
        handshake on an implicit-TLS listener. False: the connection is closed."""
        session = self.session
        assert session is not None
        front = self.front
        if front is not None and front.settings.trusted_proxies:
            peer = session.peer if isinstance(session.peer, tuple) else ("", 0)
            if is_trusted(str(peer[0]), front.settings.trusted_proxies):
                real = await proxyproto.read_header(self._reader, session.id, str(peer[0]))
                if real is None:
                    assert self.transport is not None
                    self.transport.close()
                    return False
                session.peer = real  # type: ignore[assignment]  # aiosmtpd's is a (host, port)
        if self.listener != "implicit":
            return True
        if self.tls_context is None:  # [server.tls] removed by a reload: nothing to offer
            assert self.transport is not None
            self.transport.close()
            return False
        return await self._start_tls()

    # ------------------------------------------------------------ STARTTLS

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if not self.tls_context:
            # Postfix's reply without TLS. aiosmtpd's "454 TLS not available" is a
            # temporary failure: it would have the client try TLS again later.
            await self.push("502 5.5.1 Error: command not implemented")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if self.encrypted:
            await self.push("554 5.5.1 Error: TLS already active")
            return
        if self.envelope is not None and self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        await self.push("220 2.0.0 Ready to start TLS")
        await self._start_tls()

    def tls_refused(self, is_customer: bool) -> str:
        """The 530 for MAIL in clear text from a customer that must use TLS, else ''."""
        front = self.front
        if (
            self.encrypted
            or front is None
            or self.tls_context is None
            or front.settings.tls.customers != "encrypt"
            or not is_customer
        ):
            return ""
        return "530 5.7.0 Must issue a STARTTLS command first"

    # ------------------------------------------------------------ AUTH

    @syntax("AUTH mechanism [initial-response]", when="auth_enabled")
    async def smtp_AUTH(self, arg: str | None) -> None:
        if not self.auth_enabled:
            await self.push("503 5.5.1 Error: authentication not enabled")
            return
        if await self.check_helo_needed("EHLO"):
            return
        session = self.session
        assert session is not None and self.front is not None
        if not session.extended_smtp:
            await self.push("503 5.5.1 Error: send EHLO first")
            return
        if not self.encrypted:
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if session.authenticated:
            await self.push("503 5.5.1 Error: already authenticated")
            return
        if self.envelope is not None and self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        args = (arg or "").split()
        if not args or len(args) > 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mech = args[0].upper()
        if mech not in ("PLAIN", "LOGIN"):
            await self.push("504 5.5.4 Unsupported authentication mechanism")
            return
        addr = session.client.addr
        failures = self.front.failures
        if failures.blocked(addr=addr):
            log.warning(
                "%s: warning: %s: SASL %s refused: too many failed logins from this address",
                session.id,
                session.client.label,
                mech,
            )
            await self.push(
                f"421 4.7.0 {self.hostname} Error: too many failed logins; try again later"
            )
            self.close_after_reply()  # type: ignore[attr-defined]
            return
        creds = await self._credentials(mech, args[1] if len(args) == 2 else None)
        if creds is None:
            return
        login, password = creds
        reply = await self._check(session, mech, login, password)
        await self.push(reply)

    async def _credentials(self, mech: str, initial: str | None) -> tuple[str, str] | None:
        """(login, password) from the client, or None with the reply sent."""
        if mech == "PLAIN":
            response = initial if initial is not None else await self._ask("")
            if response is None:
                return None
            creds = parse_plain(response) if response != "=" else None
            if creds is None:
                await self.push("501 5.5.2 Error: invalid PLAIN response")
            return creds
        if initial is None:
            initial = await self._ask("VXNlcm5hbWU6")  # "Username:"
            if initial is None:
                return None
        login = b64decode(initial)
        answer = await self._ask("UGFzc3dvcmQ6") if login else None  # "Password:"
        if login and answer is None:
            return None
        password = b64decode(answer) if answer is not None else None
        if not login or not password:
            await self.push("501 5.5.2 Error: invalid LOGIN response")
            return None
        return login, password

    async def _ask(self, challenge: str) -> str | None:
        """One 334 round; None (501 sent) when the client cancels with '*'."""
        await self.push(f"334 {challenge}")
        line = await self._reader.readuntil()
        text = line.decode("ascii", "replace").strip()
        if text == "*":
            await self.push("501 5.7.0 Error: authentication aborted")
            return None
        return text

    async def _check(self, session: MaildSession, mech: str, login: str, password: str) -> str:
        front = self.front
        assert front is not None and front.auth is not None
        addr = session.client.addr
        failed = "535 5.7.8 Error: authentication failed"
        if front.failures.blocked(login=login):
            front.failures.failed(addr, login)
            log.warning(
                "%s: warning: %s: SASL %s authentication failed: login=%s "
                "reason=too many failed logins for this login",
                session.id,
                session.client.label,
                mech,
                shown_login(login),
            )
            return failed
        sock = self.transport.get_extra_info("sockname") if self.transport else None
        try:
            verdict = await front.auth.check(
                login,
                password,
                client_ip=addr,
                local_ip=str(sock[0]) if sock else "",
                secured=self.encrypted,
            )
        except AuthUnavailable as e:
            log.error("%s: error: %s: SASL %s: %s", session.id, session.client.label, mech, e)
            return "454 4.7.0 Temporary authentication failure"
        if verdict.ok:
            session.authenticated = True
            session.login_data = verdict.login
            session.auth_login = verdict.login
            log.info(
                "%s: client=%s sasl_method=%s sasl_username=%s",
                session.id,
                session.client.label,
                mech,
                shown_login(verdict.login),
            )
            return "235 2.7.0 Authentication successful"
        if verdict.temporary:
            log.warning(
                "%s: warning: %s: SASL %s authentication failed: login=%s reason=temporary",
                session.id,
                session.client.label,
                mech,
                shown_login(login),
            )
            return "454 4.7.0 Temporary authentication failure"
        front.failures.failed(addr, login)
        log.warning(
            "%s: warning: %s: SASL %s authentication failed: login=%s reason=%s",
            session.id,
            session.client.label,
            mech,
            shown_login(login),
            shown_login(verdict.reason.replace(" ", "_")) if verdict.reason else "bad_credentials",
        )
        return failed
