"""The proxy: runs the policy pipeline at each stage and relays the transaction downstream.

The rule that matters most: the client hears 250 for its message only after the
downstream accepted it, and hears the downstream's own reply (with its queue id). No
downstream connection (a Postfix smtpd process) is taken before the transaction has a
recipient maild accepted: MAIL is answered here, and the first accepted RCPT sends
XFORWARD, MAIL and RCPT together (451 4.4.5 at once when the downstream caps are
reached); later RCPTs are relayed as they arrive, so per-recipient refusals by Postfix
reach the client per recipient. Any internal failure (downstream down or slow, state
store error, a bug) answers 4xx so the client retries; nothing is answered 250 and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter

from maild import log as mlog
from maild.address import Address
from maild.config import Config
from maild.policy import pipeline
from maild.policy.context import Context, Message
from maild.policy.customer import resolve
from maild.policy.services import Services
from maild.policy.verdict import Verdict
from maild.smtp import xforward
from maild.smtp.admission import LogOnce, Refusal
from maild.smtp.budget import Content
from maild.smtp.data import Abort
from maild.smtp.downstream import (
    Connection,
    Downstream,
    DownstreamBusy,
    DownstreamError,
    Reply,
)
from maild.smtp.own_headers import customer_header, header_line, strip_own_headers
from maild.smtp.received import authenticated_login, date_now, received_header
from maild.smtp.server import MaildEnvelope, MaildSession, MaildSMTP
from maild.store.base import Health, StoreError
from maild.store.core import DecisionLog, DecisionRow

log = logging.getLogger("maild.smtp")

LATE_REPLY_WAIT = 600.0  # RFC 5321 4.5.3.2.6: a client waits 10 minutes for the final reply


class LateReplies:
    """Messages whose final reply came after we had answered 451 (see handle_DATA).

    Keyed by what identifies the message (key()); a late 250 is remembered for `keep`
    seconds so that the client's retry is answered 250 and not relayed again. The
    window that remains is in docs/reliability.md ("Retries after a late accept").
    """

    def __init__(self, keep: float = 86400.0, max_entries: int = 100_000):
        self.keep = keep
        self.max_entries = max_entries
        self.accepted: dict[str, str] = {}
        self.pending: set[str] = set()
        self._when: dict[str, float] = {}

    @staticmethod
    def key(ctx: Context) -> str:
        """The envelope (sender, the set of recipients) and the Message-ID, or the whole
        content for a message without one.

        A client that rebuilds its message for the retry (a new Date:, a new MIME
        boundary) keeps its Message-ID, and by RFC 5322 3.6.4 a Message-ID names one
        message: two different contents under one id, sender and recipients are one
        message, of which the first copy was delivered.
        """
        import hashlib

        h = hashlib.sha256()
        h.update((ctx.sender.raw if ctx.sender else "").encode("utf-8", "surrogateescape"))
        for raw in sorted(a.raw for a in ctx.recipients):
            h.update(b"\0" + raw.encode("utf-8", "surrogateescape"))
        msgid = message_id(ctx.message) if ctx.message else None
        if msgid is not None:
            h.update(b"\0id\0" + msgid.encode())
        else:
            # a spooled message's content here is its first bytes: its size goes in too
            h.update(
                b"\0content\0%d\0" % (ctx.message.size if ctx.message else 0)
                + (ctx.message.content if ctx.message else b"")
            )
        return h.hexdigest()

    def watch(
        self,
        key: str,
        task: asyncio.Future[Reply],
        conn: Connection,
        downstream: Downstream,
        session_id: str,
    ) -> None:
        self.pending.add(key)

        def done(t: asyncio.Future[Reply]) -> None:
            self.pending.discard(key)
            reply = None if t.cancelled() or t.exception() else t.result()
            downstream.release(conn, reusable=False)
            if reply is not None and reply.ok:
                self._expire()
                first = reply.text.splitlines()[0] if reply.text else ""
                self.accepted[key] = (
                    first.removeprefix("2.0.0 ").removeprefix("Ok: ").strip() or "queued"
                )
                self._when[key] = time.monotonic()
                log.warning(
                    "%s: warning: downstream accepted late: %d %s; the client's retry "
                    "will be answered 250 without relaying again",
                    session_id,
                    reply.code,
                    first,
                )

        task.add_done_callback(done)

    def _expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, t in self._when.items() if now - t > self.keep]:
            self.accepted.pop(k, None)
            self._when.pop(k, None)
        while len(self.accepted) >= self.max_entries:
            k = next(iter(self.accepted))
            self.accepted.pop(k)
            self._when.pop(k, None)


_MSGID = re.compile(r"\s*(<[!-;=?-~]+>)\s*")  # RFC 5322 3.6.4 msg-id, no comments


def message_id(message: Message) -> str | None:
    """The message's one Message-ID, or None (missing, repeated, or not a plain msg-id:
    then the content identifies the message)."""
    values = message.header_values.get("message-id", [])
    if len(values) != 1:
        return None
    m = _MSGID.fullmatch(values[0].replace("\r\n", "").replace("\n", ""))
    return m.group(1) if m else None


TEMPFAIL_DOWNSTREAM = "451 4.4.1 Temporary failure: our mail server is unavailable; try again later"
TEMPFAIL_INTERNAL = "451 4.3.0 Temporary internal error; try again later"


class Proxy:
    """The aiosmtpd handler shared by every session (maild.smtp.hooks.SessionHooks)."""

    def __init__(
        self,
        config: Config,
        downstream: Downstream,
        decisions: DecisionLog | None,
        services: Services | None = None,
        health: Health | None = None,
    ):
        self.config = config
        self.services = services if services is not None else Services()
        self.downstream = downstream
        self.decisions = decisions
        # While the state store takes no writes, no transaction is accepted: the strikes,
        # consent events and counters it would produce could not be recorded.
        self.health = health
        self.started = time.time()
        self.stats = {"relayed": 0, "rejected": 0, "tempfailed": 0}
        # (stage, action, rule) -> decisions, for /metrics; rule names are a fixed set.
        self.decided: Counter[tuple[str, str, str]] = Counter()
        self.late = LateReplies()
        # Sessions shed and downstream refusals: logged once per client per minute.
        self.shed_log = LogOnce()
        self.busy_log = LogOnce()

    # ------------------------------------------------------------------ logging

    def record(
        self,
        session: MaildSession,
        action: str,
        stage: str,
        reply: str,
        *,
        rule: str = "-",
        ctx: Context | None = None,
        rcpt: Address | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        """One syslog line and one decision-log row per decision."""
        try:
            client = session.client
            sender = mlog.printable(ctx.sender.addr) if ctx and ctx.sender else ""
            if rcpt is not None:
                to = mlog.printable(rcpt.addr or rcpt.raw)
            elif ctx and ctx.recipients:
                to = mlog.printable(",".join(a.addr for a in ctx.recipients[:20]))
            else:
                to = ""
            customer = ctx.identity.name if ctx else "-"
            fields = {"customer": customer}
            if ctx and ctx.identity.customer:
                fields["by"] = ctx.identity.by
            fields.update({"from": f"<{sender}>", "to": f"<{to}>" if "," not in to else to})
            if extra:
                fields.update(extra)
            fields["rule"] = rule
            line = mlog.decision_line(session.id, action, stage, client.label, reply, fields)
            (log.warning if action != "relay" else log.info)(line)
            code, _, rest = reply.partition(" ")
            status, _, reason = rest.partition(" ")
            if self.decisions is not None:
                size = ctx.message.size if ctx and ctx.message else 0
                self.decisions.add(
                    DecisionRow(
                        ts=time.time(),
                        session=session.id,
                        stage=stage,
                        action=action,
                        code=int(code) if code.isdigit() else 0,
                        status=status,
                        reason=mlog.clean(reason, 300),
                        rule=rule,
                        client_name=client.name,
                        client_addr=client.addr,
                        customer=customer,
                        sender=sender,
                        recipient=to,
                        size=size,
                    )
                )
            key = {"relay": "relayed", "reject": "rejected"}.get(action, "tempfailed")
            self.stats[key] += 1
            self.decided[(stage, action, rule)] += 1
        except Exception:  # logging must never turn a delivered message into an error
            log.exception("cannot record decision")

    def _verdict(
        self, session: MaildSession, v: Verdict, ctx: Context, rcpt: Address | None = None
    ) -> str:
        reply = v.reply.encode("utf-8", "replace").decode("utf-8")  # an 8-bit address in it
        self.record(
            session, v.action.value, ctx.stage.value, reply, rule=v.rule, ctx=ctx, rcpt=rcpt
        )
        sanctions = self.services.sanctions
        if v.strike and ctx.identity.customer is not None and sanctions is not None:
            sanctions.strike_soon(ctx.identity.customer.name, v.rule, v.reason, session=session.id)
        return reply

    def _context(self, session: MaildSession, sender: Address, params: list[str]) -> Context:
        return Context(
            config=self.config,
            session_id=session.id,
            client=session.client,
            sender=sender,
            mail_params=params,
            services=self.services,
        )

    # ------------------------------------------------------------------ session

    def session_refused(self, session: MaildSession, refusal: Refusal) -> None:
        # Once per client per minute (admission control counts what it did not log).
        if refusal.log:
            self.record(
                session,
                "tempfail",
                "CONNECT",
                refusal.reply,
                rule=refusal.rule,
                extra={"unsaid": str(refusal.unsaid)} if refusal.unsaid else None,
            )

    def session_shed(self, session: MaildSession, reply: str) -> None:
        say, unsaid = self.shed_log.say(session.client.addr)
        if say:
            self.record(
                session,
                "tempfail",
                "CONNECT",
                reply,
                rule="stress",
                extra={"unsaid": str(unsaid)} if unsaid else None,
            )

    def session_lost(self, session: MaildSession) -> None:
        self._drop_conn(session, reusable=False)

    def path_refused(
        self, session: MaildSession, stage: str, reply: str, address: Address, rule: str
    ) -> None:
        """A MAIL or RCPT refused by the protocol rules before any policy ran (SMTPUTF8,
        TLS required)."""
        if stage == "MAIL":
            ctx = self._context(session, address, [])
            ctx.identity = resolve(self.config, session.client, session.auth_login, address)
            self.record(session, "reject", stage, reply, rule=rule, ctx=ctx)
        else:
            self.record(session, "reject", stage, reply, rule=rule, ctx=session.ctx, rcpt=address)

    async def xforward_refused(self, session: MaildSession) -> None:
        self.record(
            session,
            "reject",
            "XFORWARD",
            "550 5.7.0 Error: insufficient authorization",
            rule="xforward",
        )

    def apply_xforward(self, session: MaildSession) -> None:
        """XFORWARD from a trusted upstream defines the client that policy sees."""
        xforward.apply(session.xforward, session.client, self.services.sessions, session.counted)

    def data_aborted(self, session: MaildSession, abort: Abort) -> None:
        self.record(
            session,
            "reject" if abort.reply.startswith("5") else "tempfail",
            "DATA",
            abort.reply,
            rule=abort.kind.rule,
            ctx=session.ctx,
        )
        self._drop_conn(session, reusable=True, rset=True)

    async def handle_HELO(
        self, server: MaildSMTP, session: MaildSession, envelope: MaildEnvelope, hostname: str
    ) -> str:
        session.host_name = hostname
        if "HELO" not in session.xforward:
            session.client.helo = hostname
            session.client.proto = "SMTP"
        return f"250 {server.hostname}"

    async def handle_EHLO(
        self,
        server: MaildSMTP,
        session: MaildSession,
        envelope: MaildEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if "HELO" not in session.xforward:
            session.client.helo = hostname
        if "PROTO" not in session.xforward:
            session.client.proto = "ESMTP"
        self._drop_conn(session, reusable=True, rset=True)  # EHLO resets any transaction
        # aiosmtpd's own lines: the host name, SIZE, 8BITMIME, SMTPUTF8 (STARTTLS and
        # AUTH when they are on), HELP. PIPELINING: aiosmtpd reads one command at a time
        # and answers in order, so a pipelined group (RFC 2920) is handled; smtpsmug
        # counted pipelining without the keyword as bad synchronization.
        extra = ["250-ENHANCEDSTATUSCODES", "250-DSN"]
        if session.client.trusted_peer:
            extra.append("250-XFORWARD " + " ".join(xforward.ATTRS))
        # One element, so aiosmtpd pushes the whole reply in one write: it writes (and
        # the kernel sends) each element on its own, and on loopback every send wakes
        # the client: 8 sends per session where one does.
        return [
            "\r\n".join(
                responses[:1] + ["250-PIPELINING"] + responses[1:-1] + extra + responses[-1:]
            )
        ]

    # ------------------------------------------------------------------ transaction

    def _drop_conn(self, session: MaildSession, *, reusable: bool, rset: bool = False) -> None:
        """End the session's transaction (unaccepted, if it was still open)."""
        conn: Connection | None = session.conn
        if session.ctx is not None:
            pipeline.finish(session.ctx, accepted=False)
        session.conn = None
        session.ctx = None
        if conn is None:
            return
        if rset and reusable:
            asyncio.get_running_loop().create_task(self._rset_release(conn))
        else:
            self.downstream.release(conn, reusable=reusable)

    async def _rset_release(self, conn: Connection) -> None:
        try:
            r = await self.downstream.command(conn, "RSET", timeout=10)
            self.downstream.release(conn, reusable=r.code == 250)
        except DownstreamError:
            self.downstream.release(conn, reusable=False)

    @staticmethod
    def _xforward_refused(session: MaildSession, r: Reply) -> None:
        log.warning(
            "%s: warning: downstream refused XFORWARD (%d %s); allow "
            "maild in smtpd_authorized_xforward_hosts",
            session.id,
            r.code,
            r.text.splitlines()[0] if r.text else "",
        )

    async def _open(
        self, session: MaildSession, rcpt_line: str, *, reserved: bool
    ) -> tuple[Connection, Reply, Reply | None]:
        """At the first accepted RCPT: acquire a connection (DownstreamBusy past a cap),
        send XFORWARD, MAIL and RCPT; retry once if a pooled one died. (conn, the reply
        to MAIL, the reply to RCPT or None if MAIL was refused)."""
        mail_line = session.mail_line
        for attempt in (1, 2):
            conn, pooled = await self.downstream.acquire(session.client.addr, reserved=reserved)
            try:
                lines = xforward.downstream_lines(session.client, conn.xforward)
                rcpt: Reply | None = None
                if len(lines) <= 1 and conn.pipelining:
                    # one write, one round trip (RFC 2920: XFORWARD, MAIL and RCPT may be
                    # grouped; a refused MAIL makes Postfix refuse the RCPT too)
                    replies = await self.downstream.pipeline(conn, lines + [mail_line, rcpt_line])
                    if lines and replies[0].code != 250:
                        self._xforward_refused(session, replies[0])
                    reply, rcpt = replies[-2], replies[-1]
                else:
                    for line in lines:
                        r = await self.downstream.command(conn, line)
                        if r.code != 250:
                            self._xforward_refused(session, r)
                            break
                    reply = await self.downstream.command(conn, mail_line)
                    if reply.ok:
                        rcpt = await self.downstream.command(conn, rcpt_line)
                if reply.code == 421:
                    raise DownstreamError(f"downstream said {reply.code} {reply.text}")
                return conn, reply, rcpt if reply.ok else None
            except DownstreamError:
                self.downstream.release(conn, reusable=False)
                if not pooled or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def handle_MAIL(
        self,
        server: MaildSMTP,
        session: MaildSession,
        envelope: MaildEnvelope,
        address: Address,
        params: list[str],
    ) -> str:
        self._drop_conn(session, reusable=True, rset=True)
        ctx = self._context(session, address, params)
        try:
            ctx.identity = resolve(self.config, session.client, session.auth_login, address)
            if self._store_down():
                return self._tempfail(session, ctx, "MAIL", TEMPFAIL_INTERNAL, "store")
            await pipeline.mail(ctx)  # a refusal is given at RCPT (smtpd_delay_reject)
        except StoreError as e:
            log.error("%s: error: state store: %s", session.id, e)
            return self._tempfail(session, ctx, "MAIL", TEMPFAIL_INTERNAL, "store")
        # No downstream connection (and no Postfix smtpd process) until a recipient is
        # accepted: a stranger parking after MAIL FROM holds nothing downstream.
        session.mail_line = "MAIL FROM:" + address.raw + (" " + " ".join(params) if params else "")
        session.ctx = ctx
        envelope.mail_from = address.addr or "<>"
        envelope.sender = address
        envelope.mail_params = params
        envelope.mail_options = params
        return "250 2.1.0 Ok"

    def _store_down(self) -> bool:
        return self.health is not None and not self.health.ok

    def _downstream_refused(
        self, session: MaildSession, reply: Reply, ctx: Context, rcpt: Address
    ) -> None:
        """One decision line for a recipient the downstream refused (or whose MAIL it did)."""
        self.record(
            session,
            "reject" if reply.code >= 500 else "tempfail",
            "RCPT",
            f"{reply.code} {reply.text.splitlines()[0] if reply.text else ''}",
            rule="downstream",
            ctx=ctx,
            rcpt=rcpt,
        )

    def _tempfail(
        self,
        session: MaildSession,
        ctx: Context | None,
        stage: str,
        reply: str,
        rule: str,
        rcpt: Address | None = None,
    ) -> str:
        self.record(session, "tempfail", stage, reply, rule=rule, ctx=ctx, rcpt=rcpt)
        return reply

    async def handle_RCPT(
        self,
        server: MaildSMTP,
        session: MaildSession,
        envelope: MaildEnvelope,
        address: Address,
        params: list[str],
    ) -> str:
        ctx: Context | None = session.ctx
        conn: Connection | None = session.conn
        if ctx is None:
            return self._tempfail(
                session, ctx, "RCPT", TEMPFAIL_DOWNSTREAM, "downstream", rcpt=address
            )
        try:
            v = await pipeline.rcpt(ctx, address)
        except StoreError as e:
            log.error("%s: error: state store: %s", session.id, e)
            return self._tempfail(session, ctx, "RCPT", TEMPFAIL_INTERNAL, "store", address)
        if not v.accepted:
            return self._verdict(session, v, ctx, rcpt=address)
        line = "RCPT TO:" + address.raw + (" " + " ".join(params) if params else "")
        if conn is None:
            opened = await self._open_at_rcpt(session, ctx, address, v, line)
            if isinstance(opened, str):
                return opened
            reply = opened
        else:
            try:
                reply = await self.downstream.command(conn, line)
            except DownstreamError as e:
                log.error("%s: error: downstream lost at RCPT: %s", session.id, e)
                self._drop_conn(session, reusable=False)
                return self._tempfail(
                    session, ctx, "RCPT", TEMPFAIL_DOWNSTREAM, "downstream", address
                )
        pipeline.rcpt_done(ctx, address, v, relayed=reply.ok)
        if reply.ok:
            envelope.rcpt_tos.append(address.addr)
            envelope.rcpt_options.extend(params)
        else:
            self._downstream_refused(session, reply, ctx, address)
        return reply.smtp()

    async def _open_at_rcpt(
        self, session: MaildSession, ctx: Context, address: Address, v: Verdict, rcpt_line: str
    ) -> Reply | str:
        """The transaction's downstream connection, opened for its first accepted
        recipient: the downstream's reply to that RCPT, or the reply to give instead."""
        # Customers (by login or network) and postmaster mail use the reserved share.
        reserved = ctx.identity.may_relay or v.postmaster
        try:
            conn, mail, reply = await self._open(session, rcpt_line, reserved=reserved)
        except DownstreamBusy as e:
            pipeline.rcpt_done(ctx, address, v, relayed=False)
            say, unsaid = self.busy_log.say((session.client.addr, e.rule))
            if say:
                self.record(
                    session,
                    "tempfail",
                    "RCPT",
                    e.reply,
                    rule=e.rule,
                    ctx=ctx,
                    rcpt=address,
                    extra={"unsaid": str(unsaid)} if unsaid else None,
                )
            return e.reply
        except DownstreamError as e:
            pipeline.rcpt_done(ctx, address, v, relayed=False)
            log.error(
                "%s: error: downstream %s:%d: %s",
                session.id,
                self.downstream.host,
                self.downstream.port,
                e,
            )
            return self._tempfail(session, ctx, "RCPT", TEMPFAIL_DOWNSTREAM, "downstream", address)
        if reply is None:  # the downstream refused MAIL FROM: the client hears it here
            pipeline.rcpt_done(ctx, address, v, relayed=False)
            self.downstream.release(conn, reusable=mail.code != 421)
            self._downstream_refused(session, mail, ctx, address)
            return mail.smtp()
        session.conn = conn
        return reply

    async def handle_DATA_START(
        self, server: MaildSMTP, session: MaildSession, envelope: MaildEnvelope
    ) -> str | None:
        if session.conn is None or session.ctx is None:
            return self._tempfail(session, session.ctx, "DATA", TEMPFAIL_DOWNSTREAM, "downstream")
        return None

    async def handle_DATA(
        self, server: MaildSMTP, session: MaildSession, envelope: MaildEnvelope
    ) -> str:
        content = envelope.original_content
        assert isinstance(content, Content)  # smtp_DATA sets it before this hook
        try:
            return await self._data(session, content)
        finally:
            # The RAM charge and the spool file, on every path (a relay still running in
            # the background for a late reply closes it when it ends).
            if not content.pinned:
                content.close()
            envelope.original_content = envelope.content = None

    async def _data(self, session: MaildSession, content: Content) -> str:
        ctx: Context | None = session.ctx
        conn: Connection | None = session.conn
        if ctx is None or conn is None:
            return self._tempfail(session, ctx, "DATA", TEMPFAIL_DOWNSTREAM, "downstream")
        message = Message(content.head, spooled_size=content.size if content.spooled else 0)
        try:
            if session.client.trusted_peer:
                login = authenticated_login(message.headers)
                if login:
                    ctx.identity = resolve(ctx.config, session.client, login, ctx.sender)
            v = await pipeline.data(ctx, message)
        except StoreError as e:
            log.error("%s: error: state store: %s", session.id, e)
            self._drop_conn(session, reusable=True, rset=True)
            return self._tempfail(session, ctx, "DATA", TEMPFAIL_INTERNAL, "store")
        if not v.accepted:
            self._drop_conn(session, reusable=True, rset=True)
            return self._verdict(session, v, ctx)
        if self._store_down():  # it broke during this transaction
            self._drop_conn(session, reusable=True, rset=True)
            return self._tempfail(session, ctx, "DATA", TEMPFAIL_INTERNAL, "store")
        added = received_header(
            session.client,
            ctx.config.server.hostname,
            session.id,
            ctx.recipients,
            date_now(),
            tls=session.tls,
            authenticated=bool(session.auth_login),
        )
        added += customer_header(ctx.identity)
        added += b"".join(header_line(n, v) for n, v in ctx.add_headers)
        # Only while some late reply is awaited or remembered can this be a retry of one
        # (the key reads the Message-ID: a header parse not every message needs).
        key = self.late.key(ctx) if self.late.pending or self.late.accepted else None
        if key in self.late.pending:
            # The first attempt's late reply is still awaited: relaying again could make
            # a second copy. The client retries later and learns the outcome then.
            self._drop_conn(session, reusable=True, rset=True)
            return self._tempfail(session, ctx, "DATA", TEMPFAIL_DOWNSTREAM, "late-pending")
        if key is not None and (queued := self.late.accepted.get(key)) is not None:
            # The client retries a message the downstream took after we had answered 451:
            # say 250 and do not relay it a second time. It was delivered: charged now
            # (the first attempt heard 451 and released its reservation).
            pipeline.finish(ctx, accepted=True)
            self._drop_conn(session, reusable=True, rset=True)
            reply_text = f"250 2.0.0 Ok: {queued} (accepted earlier, after a delay)"
            self.record(session, "relay", "DATA", reply_text, rule="late-accept", ctx=ctx)
            return reply_text
        if content.spooled:  # the header from RAM, the body from the spool file
            head, rest = content.head[: content.header_end], content.blocks(content.header_end)
        else:
            head, rest = content.head, iter(())
        task = asyncio.ensure_future(
            self.downstream.data(
                conn,
                added + strip_own_headers(head),
                timeout=LATE_REPLY_WAIT,
                rest=rest,
                rest_size=content.size - len(head) if content.spooled else 0,
            )
        )
        try:
            reply = await asyncio.wait_for(asyncio.shield(task), self.downstream.timeout)
        except TimeoutError:
            # Postfix may still queue it (its smtpd finishes end-of-data work even if we
            # stop listening), so keep waiting in the background and remember a late 250:
            # the client's retry of the same message is then answered without a 2nd copy.
            where = "after the final dot" if conn.content_sent else "at the DATA command"
            log.error(
                "%s: error: downstream slower than %gs %s; answering 451 and waiting for its reply",
                session.id,
                self.downstream.timeout,
                where,
            )
            self.late.watch(key or self.late.key(ctx), task, conn, self.downstream, session.id)
            content.pin_until(task)
            session.conn = None
            self._drop_conn(session, reusable=False)
            return self._tempfail(session, ctx, "DATA", TEMPFAIL_DOWNSTREAM, "downstream")
        except asyncio.CancelledError:
            # The client reset the connection while Postfix held the final dot. Postfix
            # may still queue the message: the client will retry it, and the retry must
            # be answered from Postfix's late reply, not relayed a second time.
            log.warning(
                "%s: warning: client left while the downstream held the final dot; "
                "its reply is kept for the client's retry",
                session.id,
            )
            self.late.watch(key or self.late.key(ctx), task, conn, self.downstream, session.id)
            content.pin_until(task)
            session.conn = None
            raise
        except DownstreamError as e:
            # The connection broke before a reply: the downstream never acknowledged the
            # final dot; the retry is what a client does with any 4xx.
            log.error("%s: error: downstream lost during DATA: %s", session.id, e)
            self._drop_conn(session, reusable=False)
            return self._tempfail(session, ctx, "DATA", TEMPFAIL_DOWNSTREAM, "downstream")
        pipeline.finish(ctx, accepted=reply.ok)
        session.conn = session.ctx = None
        self.downstream.release(conn, reusable=True)
        first = reply.text.splitlines()[0] if reply.text else ""
        action = "relay" if reply.ok else ("reject" if reply.code >= 500 else "tempfail")
        self.record(
            session,
            action,
            "DATA",
            f"{reply.code} {first}",
            rule=v.rule if reply.ok else "downstream",
            ctx=ctx,
            extra={"size": str(message.size), "nrcpt": str(len(ctx.recipients))},
        )
        return reply.smtp()

    async def handle_RSET(
        self, server: MaildSMTP, session: MaildSession, envelope: MaildEnvelope
    ) -> str:
        self._drop_conn(session, reusable=True, rset=True)
        return "250 2.0.0 Ok"

    async def handle_QUIT(
        self, server: MaildSMTP, session: MaildSession, envelope: MaildEnvelope
    ) -> str:
        self._drop_conn(session, reusable=True, rset=True)
        return "221 2.0.0 Bye"

    async def handle_exception(self, error: Exception) -> str:
        log.exception("error: internal error in SMTP session: %s", type(error).__name__)
        return TEMPFAIL_INTERNAL
