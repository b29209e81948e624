"""maild's SMTP server: aiosmtpd with what a proxy in front of Postfix needs.

What this subclass adds to aiosmtpd 1.4.6, and why:
- MAIL and RCPT keep the raw path and parameters, because Postfix requires a proxy to
  forward them unmodified (aiosmtpd's parsed address loses routes and quoting); DSN
  parameters (RET, ENVID, NOTIFY, ORCPT) are accepted and relayed.
- XFORWARD, advertised and accepted only from trusted upstreams (550 5.7.0 otherwise).
- SMTPUTF8 (RFC 6531 3.4): a non-ASCII path or parameter only in a transaction that
  declared it, and only valid UTF-8 (553 5.6.7); aiosmtpd would pass either on.
- STARTTLS, implicit TLS, AUTH and the PROXY protocol in front mode (maild.smtp.front);
  without [server.tls] STARTTLS and AUTH are answered as Postfix answers them when they
  are off and left out of HELP. BDAT, which maild does not offer, ends the session (its
  chunk would be read as commands).
- DATA is read with SMTP smuggling in mind: aiosmtpd passes bare LF and bare CR inside
  data untouched, and Postfix's own smtpd_forbid_bare_newline exempts $mynetworks, so
  the re-injection smtpd would take `\\n.\\n` as end of data. maild refuses any bare CR
  or LF (in data and in command lines) with 550 5.5.2 and closes the session, and NUL
  bytes with 550 5.6.0: nothing after such a byte can reach the downstream.
- Limits with enhanced status codes: message size (SIZE advertised and enforced), DATA
  line length (RFC 5321's count: no CRLF, no stuffed dot), command idle timeout and a
  whole-DATA deadline (slowloris), sessions overall and per client IP (421 4.7.0).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import secrets
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import Envelope, Session, syntax

from maild.address import (
    Address,
    PathError,
    declares_smtputf8,
    eight_bit,
    parse_params,
    parse_path,
    split_arg,
)
from maild.config import Server
from maild.netaddr import is_trusted, peer_address
from maild.policy.context import Client, Context
from maild.smtp import xforward
from maild.smtp.admission import Admission, Refusal, Slot
from maild.smtp.budget import Budget, Content
from maild.smtp.compat import JUNK_COMMAND_LIMITS, SUPPORTED, FastInit
from maild.smtp.data import Abort, AbortKind, ClientEOF, read_data
from maild.smtp.front import Front, FrontSMTP
from maild.smtp.hooks import SessionHooks
from maild.smtp.sessions import SessionCounter

if TYPE_CHECKING:
    from maild.smtp.downstream import Connection

log = logging.getLogger("maild.smtp")
MAIL_PARAMS = {"BODY", "SIZE", "SMTPUTF8", "RET", "ENVID"}
RCPT_PARAMS = {"NOTIFY", "ORCPT"}


class BareLineEnding(Exception):
    """A command line ended in a bare LF or held a bare CR."""


class LineTooLong(Exception):
    """A command line longer than the reader's limit (already read to its end)."""


# RFC 2034 3: after EHLO advertised ENHANCEDSTATUSCODES, every 4xx/5xx reply carries
# one. aiosmtpd's own replies ("500 Error: bad syntax", "503 Error: send HELO first")
# do not: push() adds the code Postfix uses for the same reply.
ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")
DEFAULT_ENHANCED = {
    "421": "4.7.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.7.0",
}
PLAIN_REPLIES = {"250 OK": "250 2.0.0 Ok", "221 Bye": "221 2.0.0 Bye"}


def with_enhanced_code(reply: str) -> str:
    """The reply with an enhanced status code where a 4xx/5xx (or a bare Ok/Bye) has none."""
    if reply in PLAIN_REPLIES:
        return PLAIN_REPLIES[reply]
    if reply[:1] not in ("4", "5") or len(reply) < 4 or "\n" in reply:
        return reply
    code, text = reply[:3], reply[4:]
    if ENHANCED.match(text):
        return reply
    return f"{code} {DEFAULT_ENHANCED.get(code, reply[0] + '.0.0')} {text}".rstrip()


class MaildSession(Session):
    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(loop)
        self.id = secrets.token_hex(5).upper()
        self.client = Client(addr="")
        self.xforward: dict[str, str] = {}
        self.counted = False
        self.slot: Slot | None = None  # its session slot (maild.smtp.admission)
        # Per transaction, owned by the proxy handler.
        self.ctx: Context | None = None
        self.conn: Connection | None = None
        # MAIL FROM as the downstream gets it, at the first accepted RCPT (no downstream
        # connection for a transaction without a recipient).
        self.mail_line = ""
        self.tls = ""  # "TLSv1.3 with cipher ..." once encrypted (maild.smtp.tls.describe)
        self.auth_login = ""  # the SMTP AUTH login Dovecot accepted (maild.smtp.front)


class MaildEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.sender: Address | None = None
        self.mail_params: list[str] = []


class _Ended:
    """A session's _handler_coroutine once its task is over: aiosmtpd's connection_lost
    and eof_received still cancel it."""

    @staticmethod
    def cancel(_msg: object = None) -> bool:
        return False


_ENDED = _Ended()


class _StrictReader:
    """Wraps the StreamReader so command lines must end in CRLF and hold no bare CR.

    Only the command-line read (readuntil with its default separator) is checked;
    DATA is read by MaildSMTP.smtp_DATA with its own checks.
    """

    def __init__(self, reader: asyncio.StreamReader, owner: MaildSMTP):
        self._reader = reader
        self._owner = owner
        # Set by MaildSMTP.close_after_reply: no further command is read, even one the
        # client already sent (aiosmtpd would run it before the close takes effect).
        self.closed = False

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        if self.closed:
            raise ClientEOF()
        if separator != b"\n":
            return await self._reader.readuntil(separator)
        self._owner.waiting(True)
        try:
            line = await self._reader.readuntil(separator)
        except asyncio.LimitOverrunError as e:
            # Read the overlong line to its end before answering, so its tail (or the
            # LF after a CR the overrun split off) is not taken for the next command.
            await self._reader.read(e.consumed)
            await self.skip_line()
            raise LineTooLong() from None
        except asyncio.IncompleteReadError:
            raise ClientEOF() from None
        self._owner.waiting(False)
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            raise BareLineEnding()
        return line

    async def skip_line(self) -> None:
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as e:
                await self._reader.read(e.consumed)
            except asyncio.IncompleteReadError:
                raise ClientEOF() from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


class MaildSMTP(FrontSMTP, FastInit):
    """One SMTP session. Policy and relaying live in the handler (maild.smtp.proxy)."""

    event_handler: SessionHooks
    session: MaildSession | None
    envelope: MaildEnvelope | None
    # Its session slot, from admission control at connect (maild.smtp.gate); None for a
    # server built without the gate.
    admitted: Slot | None = None

    def __init__(
        self,
        handler: SessionHooks,
        *,
        settings: Server,
        counter: SessionCounter,
        trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
        admission: Admission,
        budget: Budget,
        front: Front | None = None,
        listener: str = "smtp",
        **kwargs: Any,
    ):
        limits = settings.limits
        # aiosmtpd sizes its StreamReader from this attribute: room for a line's text, a
        # stuffed dot and CRLF. The DATA line rule itself is read_data's (max_line).
        self.line_length_limit = limits.line_length + 3
        self.settings = settings
        self.counter = counter
        self.trusted = trusted
        self.admission = admission
        self.budget = budget
        if not kwargs and SUPPORTED:
            self._fast_init(handler, limits, settings.hostname)
        else:
            super().__init__(
                handler,
                data_size_limit=limits.message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=settings.hostname,
                ident="ESMTP maild",
                timeout=limits.command_timeout,
                command_call_limit=JUNK_COMMAND_LIMITS,
                **kwargs,
            )
        # While a handler waits on the downstream, the client is waiting on us: its idle
        # timer must not run out (that would hang up on a message Postfix then commits).
        self._hook_timeout = settings.downstream_timeout * 3 + 10
        self._deadline = 0.0  # when the idle timer really expires (see _reset_timeout)
        self.setup_front(front, listener)

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        self._reset_timeout(max(self._hook_timeout, self._timeout_duration))
        try:
            return await super()._call_handler_hook(command, *args)
        finally:
            if self.transport is not None:
                self._reset_timeout()

    # ---------------------------------------------------------------- connection

    def _create_session(self) -> MaildSession:
        return MaildSession(self.loop)

    def _create_envelope(self) -> MaildEnvelope:
        return MaildEnvelope()

    def _getaddr(self, arg: str) -> tuple[Any, Any]:
        """aiosmtpd's parser for VRFY's argument (MAIL and RCPT use maild's own).

        The standard library's address parser raises IndexError on `a@`: that was a
        451 and a logged traceback; it is the same "Could not VRFY" as any bad address.
        """
        try:
            return super()._getaddr(arg)
        except (IndexError, ValueError):
            return None, None

    # Inside a command aiosmtpd has set both (no check here: inspect.getmembers, which
    # aiosmtpd's SMTP.__init__ runs on the instance, reads these before a session exists).
    @property
    def _session(self) -> MaildSession:
        return cast(MaildSession, self.session)

    @property
    def _envelope(self) -> MaildEnvelope:
        return cast(MaildEnvelope, self.envelope)

    def _cb_client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        super()._cb_client_connected(_StrictReader(reader, self), writer)  # type: ignore[arg-type]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._client_connected_cb = None  # called; a bound method of self is a cycle
        if self.session is not None:  # released in connection_lost, whenever that comes
            self.session.slot = self.admitted
        if self._handler_coroutine is not None:
            self._handler_coroutine.add_done_callback(self._let_go)

    def _let_go(self, _task: asyncio.Task[None]) -> None:
        """The session's task is over: drop the references that lead back to the session
        (the reader naming it, the task whose exception holds its frames), so reference
        counting frees it now, not the garbage collector's next full collection, which
        traversed hundreds of dead sessions at a time on the event loop under a crowd (a
        memory peak CPython's allocator then keeps). The command tables are the class's
        (compat._Table), not a cycle of bound methods per session."""
        self._reader = self._writer = None  # type: ignore[assignment]
        self._handler_coroutine = _ENDED  # type: ignore[assignment]

    async def _handle_client(self) -> None:
        if self.needs_preamble and not await self.front_preamble():  # PROXY, implicit TLS
            return
        session = self._session
        addr, port = peer_address(session.peer)
        trusted = is_trusted(addr, self.trusted)
        session.client = Client(addr=addr, port=port, trusted_peer=trusted, name="unknown")
        if session.slot is None:  # admitted here: the client was known only after the preamble
            slot = self.admission.admit(
                addr,
                reserved=trusted or self.admission.is_customer(addr),
                exempt=trusted,
                notify=self._admission_event,
            )
            if isinstance(slot, Refusal):
                self.event_handler.session_refused(session, slot)
                await self.push(slot.reply.replace(" 4.7.0 ", f" 4.7.0 {self.hostname} ", 1))
                if self.transport is not None:
                    self.transport.close()
                return
            session.slot = slot
        self.counter.add()
        self.counter.client_add(addr)
        session.counted = True
        self._timeout_duration = self.admission.command_timeout(session.slot)
        await super()._handle_client()

    def waiting(self, idle: bool) -> None:
        """The session waits for a command (idle) or works on one: admission control
        sheds only idle strangers, and under stress gives them the shorter timeout."""
        slot = self.session.slot if self.session is not None else None
        if slot is None:
            return
        if idle:
            envelope = self.envelope
            self.admission.idle(
                slot, in_transaction=envelope is not None and envelope.mail_from is not None
            )
            duration = self.admission.command_timeout(slot)
            if duration != self._timeout_duration:
                self._timeout_duration = duration
                self._reset_timeout()
        else:
            self.admission.busy(slot)

    def _admission_event(self, event: str) -> None:
        session = self.session
        transport = self.transport
        if session is None or transport is None or transport.is_closing():
            return
        if event == "stress":  # an idle stranger's timer, shortened (never lengthened)
            duration = self.admission.command_timeout(session.slot)
            self._timeout_duration = duration
            if self.loop.time() + duration < self._deadline:
                self._reset_timeout(duration)
            return
        reply = "421 4.7.0 Server busy: closing idle sessions to make room; try again later"
        self.event_handler.session_shed(session, reply)
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(f"421 4.7.0 {self.hostname} {reply[10:]}\r\n".encode())
        if self._reader is not None:  # None once the session's task is over
            self._reader.closed = True  # type: ignore[attr-defined]
        transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        session = self.session
        if session is not None and session.slot is not None:
            self.admission.release(session.slot)
        if session is not None and session.counted:
            self.counter.remove()
            self.counter.client_remove(session.client.addr)
            session.counted = False
            self.event_handler.session_lost(session)
        # cancels the task; _let_go runs when it ends (the released slot's notify no
        # longer names this session: Admission.release)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        """A half-close: answer every command the client sent before it, then close.

        aiosmtpd cancels the session at EOF, replies still owed included: a pipelining
        client that sends QUIT and shuts down its side lost its replies, and a message
        handed to Postfix could be committed while its client never heard the 250.
        """
        if self.session is None or self.session.ssl is not None:
            return super().eof_received()
        return asyncio.StreamReaderProtocol.eof_received(self)

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = with_enhanced_code(status)
        await super().push(status)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timer, re-armed lazily.

        aiosmtpd cancels the timer and schedules a new one for every command, and maild
        moves it twice more around every handler hook and DATA: about 15 timer handles
        per message, each a heap push and a cancelled entry left in the loop's heap.
        Here a new deadline that is no earlier than the pending timer only moves
        `_deadline`; when the timer fires before the deadline, _timeout_cb re-arms it for
        the rest. A deadline earlier than the pending timer re-arms at once, so a timeout
        happens exactly at its deadline.
        """
        loop = self.loop
        now = loop.time()
        deadline = now + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is not None and not handle.cancelled() and now < handle.when() <= deadline:
            return
        if handle is not None:
            handle.cancel()
        self._timeout_handle = loop.call_at(deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        handle = self._timeout_handle
        if handle is not None and self._deadline > handle.when():  # moved on since: re-arm
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)
            return
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def handle_exception(self, error: Exception) -> str:
        """A bare LF/CR in a command ends the session; anything else is a 4xx, never a traceback."""
        if isinstance(error, BareLineEnding):
            reply = "500 5.5.2 Error: bare <LF> or <CR> in command line; end lines with CRLF"
            self.event_handler.record(self._session, "reject", "CONNECT", reply, rule="smuggling")
            self.close_after_reply()
            return reply
        if isinstance(error, LineTooLong):
            reply = (
                f"500 5.5.2 Error: command line longer than "
                f"{self.settings.limits.line_length} characters"
            )
            self.event_handler.record(self._session, "reject", "CONNECT", reply, rule="line_length")
            return reply
        return await self.event_handler.handle_exception(error)

    def close_after_reply(self) -> None:
        """Close once what was pushed so far (or the reply being returned to aiosmtpd) is
        flushed (transport.close flushes); read no further command meanwhile."""
        if self._reader is not None:  # None once the session's task is over
            self._reader.closed = True  # type: ignore[attr-defined]

        def close() -> None:
            if self.transport is not None:
                self.transport.close()

        self.loop.call_soon(close)

    # ---------------------------------------------------------------- what is offered

    # STARTTLS and AUTH: maild.smtp.front.FrontSMTP.

    async def smtp_BDAT(self, arg: str | None) -> None:
        """BDAT, although CHUNKING is not offered: the chunk that follows cannot be told
        from commands, so refuse and hang up, as Postfix does with CHUNKING off (no
        @syntax: HELP does not list it)."""
        reply = "521 5.5.1 Error: command not implemented"
        session = self._session
        self.event_handler.record(
            session, "reject", "DATA", reply, rule="smuggling", ctx=session.ctx
        )
        await self.push(reply)
        self.close_after_reply()

    # ---------------------------------------------------------------- XFORWARD

    @syntax("XFORWARD attribute=value ...", when="_xforward_allowed")
    async def smtp_XFORWARD(self, arg: str | None) -> None:
        session = self._session
        if not session.client.trusted_peer:
            await self.event_handler.xforward_refused(session)
            await self.push("550 5.7.0 Error: insufficient authorization")
            return
        if self._envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        if not arg:
            await self.push("501 5.5.4 Syntax: XFORWARD attribute=value...")
            return
        update = xforward.parse(arg)
        if isinstance(update, str):
            await self.push(update)
            return
        session.xforward.update(update)
        self.event_handler.apply_xforward(session)
        await self.push("250 2.0.0 Ok")

    @property
    def _xforward_allowed(self) -> bool:
        return bool(self.session and self.session.client.trusted_peer)

    # ---------------------------------------------------------------- MAIL / RCPT

    def _parse(
        self, keyword: str, arg: str | None, allowed: set[str]
    ) -> tuple[Address, list[str]] | str:
        """(address, params) or the error reply to send."""
        what = "sender" if keyword == "FROM:" else "recipient"
        syntaxerr = f"501 5.5.4 Syntax: {'MAIL FROM' if what == 'sender' else 'RCPT TO'}:<address>"
        rest = self._strip_command_keyword(keyword, arg or "")
        if not rest:  # "MAIL FROM:" with no path at all is not the null path <>
            return syntaxerr
        try:
            path, params = split_arg(rest)
            address = parse_path(path)
            plist = parse_params(params)
        except PathError as e:
            status = "5.1.7" if what == "sender" else "5.1.3"
            return f"501 {status} Bad {what} address syntax ({e})"
        if plist and not cast(MaildSession, self.session).extended_smtp:
            return syntaxerr
        for p in plist:
            key, _, value = p.partition("=")
            key = key.upper()
            if key not in allowed:
                return f"555 5.5.4 Unsupported option: {key[:32]}"
            if key == "SIZE":
                if not value.isdigit():
                    return "501 5.5.4 Bad message size syntax"
                if self.data_size_limit and int(value) > self.data_size_limit:
                    return (
                        f"552 5.3.4 Message size exceeds fixed limit ({self.data_size_limit} bytes)"
                    )
            elif key == "BODY" and value.upper() not in ("7BIT", "8BITMIME"):
                return "501 5.5.4 Unsupported BODY type: use 7BIT or 8BITMIME"
            elif key == "SMTPUTF8" and value:
                return "501 5.5.4 SMTPUTF8 takes no value"
            elif key == "RET" and value.upper() not in ("FULL", "HDRS"):
                return "501 5.5.4 Bad RET parameter: use FULL or HDRS"
            elif key == "NOTIFY" and not value:
                return "501 5.5.4 Bad NOTIFY parameter"
        return address, plist

    async def _refused_8bit(
        self, stage: str, address: Address, params: list[str], smtputf8: bool
    ) -> bool:
        """Refuse (and log) a non-ASCII path or parameter without SMTPUTF8, or one that is
        not valid UTF-8 (RFC 6531 3.4: 553 5.6.7); True if refused.

        Postfix's smtpd takes UTF-8 addresses without SMTPUTF8 and leaves the failure to
        a later hop; maild refuses them where the client can still act on it.
        """
        what = "Sender" if stage == "MAIL" else "Recipient"
        reply = None
        for text, name in (
            (address.raw, f"{what} address"),
            (" ".join(params), f"{stage} parameter"),
        ):
            kind = eight_bit(text)
            if kind == "malformed":
                reply = f"553 5.6.7 {name} is not valid UTF-8 (RFC 6531 3.3)"
            elif kind == "utf-8" and not smtputf8:
                reply = (
                    f"553 5.6.7 {name} has non-ASCII characters: "
                    "send MAIL FROM with SMTPUTF8 (RFC 6531 3.4)"
                )
            if reply is not None:
                self.event_handler.path_refused(self._session, stage, reply, address, "smtputf8")
                await self.push(reply)
                return True
        return False

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if self._envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        parsed = self._parse("FROM:", arg, MAIL_PARAMS)
        if isinstance(parsed, str):
            await self.push(parsed)
            return
        address, params = parsed
        if reply := self.tls_refused(self.admission.is_customer(self._session.client.addr)):
            self.event_handler.path_refused(self._session, "MAIL", reply, address, "tls")
            await self.push(reply)
            return
        if address.route or (address.domain == "" and not address.is_null):
            # A reverse path must be a full address or <>.
            await self.push("553 5.1.7 Sender address rejected: need fully-qualified address")
            return
        if await self._refused_8bit("MAIL", address, params, declares_smtputf8(params)):
            return
        status = await self._call_handler_hook("MAIL", address, params)
        await self.push(status)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if self._envelope.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        parsed = self._parse("TO:", arg, RCPT_PARAMS)
        if isinstance(parsed, str):
            await self.push(parsed)
            return
        address, params = parsed
        if address.is_null:
            await self.push("501 5.1.3 Bad recipient address syntax: empty address")
            return
        if await self._refused_8bit(
            "RCPT", address, params, declares_smtputf8(self._envelope.mail_params)
        ):
            return
        status = await self._call_handler_hook("RCPT", address, params)
        await self.push(status)

    # ---------------------------------------------------------------- DATA

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if self._envelope.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not self._envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        status = await self._call_handler_hook("DATA_START")
        if isinstance(status, str):
            await self.push(status)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content, abort = await self._read_data()
        if abort is not None:
            self.event_handler.data_aborted(self._session, abort)
            await self.push(abort.reply)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            if abort.kind.fatal:
                # The rest of the client's bytes could be read as commands: a smuggled
                # transaction. Nothing more is read from this session.
                self.close_after_reply()
            return
        self._envelope.original_content = self._envelope.content = content  # type: ignore[assignment]
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)

    async def _read_data(self) -> tuple[Content, Abort | None]:
        """Read until CRLF.CRLF under the whole-DATA deadline (maild.smtp.data), into RAM
        or a spool file as the memory budget says (maild.smtp.budget)."""
        reader: asyncio.StreamReader = self._reader._reader  # type: ignore[attr-defined]
        self._reset_timeout(self.admission.data_timeout(self._session.slot))
        sink = self.budget.sink()
        try:
            _, abort = await read_data(
                reader, self.data_size_limit or 0, self.settings.limits.line_length, sink
            )
            if abort is None and sink.error is not None:
                abort = Abort(AbortKind.MEMORY, sink.error)
            if abort is not None:
                sink.close()
            return sink.finish(), abort
        except BaseException:
            sink.close()
            raise
        finally:
            self._reset_timeout()
