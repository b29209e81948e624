"""Forged-header checks: the framework, [headers] in policies.toml, and the structure checks.

"Forging headers ... means sending email such that its origin appears to be another user
or machine, or a non-existent machine" (Demon AUP). Every check here has a name, a
default action (reject, tempfail, tag or off) that [headers.checks] and a customer's
[customers.headers.checks] override, and a reason the sender can act on. In tag mode
(`mode = "tag"`, globally or per customer) nothing is refused: the message is relayed
with an X-Maild-Verdict: line per failed check, so an operator can trial a check first.

Who is checked: mail *submitted by a customer* (identified by login or network: a sender
domain alone proves nothing) gets every check. Mail from anyone else (inbound mail from
the internet to hosted domains) gets none by default, or the checks of scope "any"
(structure, display name, DNS, HELO) with `apply_to = "all"`; ownership checks never apply
to it. The ownership, HELO, null-sender and DNS checks live in identity.py; both modules
register their checks with @check, which also registers the pipeline rules.
"""

from __future__ import annotations

import contextlib
import email.errors
import email.message
import email.policy
import inspect
import ipaddress
import logging
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

from maild import config as cfg
from maild import log as mlog
from maild.address import declares_smtputf8
from maild.antispam.limiter import Rate
from maild.policy.context import Context, Stage
from maild.policy.pipeline import Rule
from maild.policy.verdict import Verdict, reject, tempfail

log = logging.getLogger("maild.policy")

ACTIONS = ("reject", "tempfail", "tag", "off")
MODES = ("enforce", "tag")
APPLY_TO = ("customers", "all")
VERDICT_HEADER = "X-Maild-Verdict"
_DONE = "headers.done"  # ctx.notes key: {(check, customer)} already judged in this transaction


# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class HeaderSettings:
    enabled: bool = True  # false: no forged-header check runs at all
    mode: str = "enforce"
    apply_to: str = "customers"
    # check name -> action, overriding the check's default
    checks: dict[str, str] = field(default_factory=dict, hash=False)
    date_future: float = 2 * 3600.0  # rspamd DATE_IN_FUTURE: > 2 h
    date_past: float = 7 * 86400.0  # mail may sit in an offline outbox or a queue for days
    max_line_length: int = 998  # RFC 5322 2.1.1
    # bounces/auto-replies with MAIL FROM:<> per customer, [ratelimit] syntax
    null_sender_rate: Rate = Rate.parse("30/1h")
    helo_for_logins: bool = False  # MUAs behind NAT send [192.168.x.y] or a bare PC name
    own_names: tuple[str, ...] = ()  # ours, besides server.hostname and [postmaster]


@dataclass(frozen=True)
class CustomerHeaders:
    """A customer's [customers.headers]: its own mode and per-check actions."""

    mode: str = ""  # "" = the global mode
    checks: dict[str, str] = field(default_factory=dict, hash=False)


DEFAULTS = HeaderSettings()


def _check_actions(r: cfg.Reader) -> dict[str, str]:
    """[... .checks]: check name = action; unknown names are errors, not silence."""
    _load_checks()
    out: dict[str, str] = {}
    for name in list(r.table):
        if name not in CHECKS:
            r.seen.add(name)
            r.problems.append(f"{r.key(name)}: unknown check; known checks: "
                              + ", ".join(sorted(CHECKS)))
            continue
        out[name] = r.str(name, CHECKS[name].default, choices=ACTIONS)
    r.unknown()
    return out


def parse_headers(r: cfg.Reader) -> HeaderSettings:
    d = DEFAULTS
    s = HeaderSettings(
        enabled=r.bool("enabled", d.enabled),
        mode=r.str("mode", d.mode, choices=MODES),
        apply_to=r.str("apply_to", d.apply_to, choices=APPLY_TO),
        checks=_check_actions(r.table_of("checks")),
        date_future=r.duration("date_future", "2h"),
        date_past=r.duration("date_past", "7d"),
        max_line_length=r.int("max_line_length", d.max_line_length, minimum=78, maximum=100000),
        null_sender_rate=_rate(r, "null_sender_rate", d.null_sender_rate),
        helo_for_logins=r.bool("helo_for_logins", d.helo_for_logins),
        own_names=r.domains("own_names"),
    )
    r.unknown()
    return s


def _rate(r: cfg.Reader, name: str, default: Rate) -> Rate:
    value = r.str(name, default.text)
    try:
        return Rate.parse(value)
    except ValueError:
        r.error(name, value, 'a rate such as "30/1h" (messages per period)')
        return default


def parse_customer_headers(r: cfg.Reader) -> CustomerHeaders:
    if not r.has("headers"):
        r.seen.add("headers")
        return CustomerHeaders()
    t = r.table_of("headers")
    mode = t.str("mode", choices=MODES) if t.has("mode") else ""
    checks = _check_actions(t.table_of("checks"))
    t.unknown()
    return CustomerHeaders(mode, checks)


cfg.SECTION_PARSERS["headers"] = parse_headers
cfg.CUSTOMER_PARSERS["headers"] = parse_customer_headers


def settings(ctx: Context) -> HeaderSettings:
    s = ctx.config.sections.get("headers")
    return s if isinstance(s, HeaderSettings) else DEFAULTS


# --------------------------------------------------------------------------- checks

@dataclass(frozen=True)
class Finding:
    """A failed check: the reason the sender reads, and how sure we are."""

    reason: str
    dns_error: bool = False  # DNS failed: a 451 tempfail whatever the action says
    code: int = 0  # override the check's reject code/status for this finding
    status: str = ""


CheckFn = Callable[[Context], "Finding | None | Awaitable[Finding | None]"]


@dataclass(frozen=True)
class HeaderCheck:
    """A forged-header check: a function finding a problem, and what it leads to.

    Called, it is its function (unit tests call checks directly); the pipeline runs its
    `rule` at `stage`, and its `recheck_rule` at DATA when `recheck` is set (a MAIL-stage
    check judged again once the customer became known at end of data: before-queue mode,
    where the SASL login arrives in Postfix's Received line). Where each runs is its line
    in maild/policy/chain.py.
    """

    name: str
    stage: Stage
    scope: str  # "customer": submitted by a customer only; "any": see apply_to
    default: str  # reject | tempfail | tag
    code: int  # reply code and RFC 3463 status when rejecting
    status: str
    summary: str  # one line, for check-message and the docs
    fn: CheckFn
    # None, or a reason why the check does not apply to this transaction
    skip: Callable[[Context], str | None] | None = None
    is_async: bool = False
    recheck: bool = False
    # A refusal that is forgery, the AUPs' offence, counts as a sanction strike. Malformed
    # headers (a missing Date:, a bad HELO) are refused too, but are a broken mail
    # program, not abuse: two such mistakes must not block a customer's mail.
    strike: bool = False

    def __call__(self, ctx: Context) -> Finding | None | Awaitable[Finding | None]:
        return self.fn(ctx)

    @property
    def rule(self) -> Rule:
        return _rules_for(self)[0]

    @property
    def recheck_rule(self) -> Rule | None:
        return _rules_for(self)[1] if self.recheck else None


CHECKS: dict[str, HeaderCheck] = {}
_RULES: dict[str, tuple[Rule, Rule]] = {}  # check name -> (its rule, its DATA recheck rule)


def _load_checks() -> None:
    import maild.policy.identity  # noqa: F401  (declares the identity checks)


def check(name: str, stage: Stage, *, scope: str, default: str, code: int, status: str,
          summary: str, recheck: bool = False, strike: bool = False,
          skip: Callable[[Context], str | None] | None = None
          ) -> Callable[[CheckFn], HeaderCheck]:
    """Declare a check; `recheck`: a MAIL-stage check that runs again at DATA."""
    assert default in ACTIONS and scope in ("customer", "any")
    assert not recheck or stage is Stage.MAIL

    def deco(fn: CheckFn) -> HeaderCheck:
        c = HeaderCheck(name, stage, scope, default, code, status, summary, fn, skip,
                        inspect.iscoroutinefunction(fn), recheck, strike)
        CHECKS[name] = c
        _DEFAULT_ACTIONS[name] = default
        return c

    return deco


def _rules_for(c: HeaderCheck) -> tuple[Rule, Rule]:
    rules = _RULES.get(c.name)
    if rules is None:
        fn = _rule_for(c)
        rules = _RULES[c.name] = (Rule(c.name, c.stage, fn, c.is_async),
                                  Rule(c.name, Stage.DATA, fn, c.is_async))
    return rules


def _rule_for(c: HeaderCheck) -> Callable[[Context], Verdict | None | Awaitable[Verdict | None]]:
    """The check's pipeline rule: judged once per (check, customer) in a transaction,
    unless skip_reason() says it does not apply (here from the transaction's Plan).
    A synchronous check gets a synchronous rule: no coroutine per check and message."""
    name, fn, default, skip = c.name, c.fn, c.default, c.skip
    customer_only = c.scope == "customer"

    def applies(ctx: Context, p: Plan) -> bool:  # skip_reason(c, ctx) is None
        if (p.skip_customer if customer_only else p.skip_any) is not None:
            return False
        if p.actions.get(name, default) == "off":
            return False
        return skip is None or skip(ctx) is None

    if c.is_async:
        async def run(ctx: Context) -> Verdict | None:
            p = plan(ctx)
            key = (name, p.who)
            if key in p.done or not applies(ctx, p):
                return None
            p.done.add(key)
            finding = await fn(ctx)  # type: ignore[misc]
            return None if finding is None else decide(c, ctx, finding)
    else:
        def run(ctx: Context) -> Verdict | None:  # type: ignore[misc]
            p = plan(ctx)
            key = (name, p.who)
            if key in p.done or not applies(ctx, p):
                return None
            p.done.add(key)
            finding = fn(ctx)
            return None if finding is None else decide(c, ctx, finding)  # type: ignore[arg-type]

    run.__name__ = f"check_{name.replace('-', '_')}"
    return run


def submitted(ctx: Context) -> bool:
    """Submitted by a customer: identified by login or network, not by a sender domain."""
    return ctx.identity.may_relay


_DEFAULT_ACTIONS: dict[str, str] = {}  # check name -> its default action, kept by @check
_PLAN = "headers"  # ctx.cache key


class Plan:
    """[headers] as it applies to one transaction and the identity judged now: the
    settings, whether the mail is submitted, the customer's overrides, the mode, every
    check's configured action and the skip reasons that do not depend on the check.
    Computed once per transaction by plan(), again only if the identity or the config
    changes (before-queue mode: the login arrives at end of data)."""

    __slots__ = ("config", "customer", "by", "who", "settings", "submitted", "customer_headers",
                 "mode", "actions", "skip_any", "skip_customer", "done", "_own_names")

    def __init__(self, ctx: Context) -> None:
        ident = ctx.identity
        self.config = ctx.config
        self.customer = ident.customer
        self.by = ident.by
        self.who = ident.name
        s = self.settings = settings(ctx)
        sub = self.submitted = ident.may_relay
        # A stranger writing a customer's domain must not get that customer's relaxations.
        ch = ident.customer.ext.get("headers") if sub and ident.customer is not None else None
        ch = self.customer_headers = ch if isinstance(ch, CustomerHeaders) else None
        self.mode = (ch.mode if ch is not None and ch.mode else None) or s.mode
        # Precedence: the customer's override, else [headers.checks], else the default.
        self.actions = _DEFAULT_ACTIONS | s.checks | (ch.checks if ch is not None else {})
        if not s.enabled:
            self.skip_any = self.skip_customer = "[headers] enabled = false"
        elif sub:
            self.skip_any = self.skip_customer = None
        else:
            self.skip_customer = "not submitted by a customer"
            self.skip_any = (None if s.apply_to == "all"
                             else 'not submitted by a customer (apply_to = "customers")')
        done = ctx.notes.setdefault(_DONE, set())
        self.done: set[tuple[str, str]] = done  # type: ignore[assignment]
        self._own_names: frozenset[str] | None = None

    def action(self, c: HeaderCheck) -> str:
        return self.actions.get(c.name, c.default)

    def skip_reason(self, c: HeaderCheck, ctx: Context) -> str | None:
        why = self.skip_customer if c.scope == "customer" else self.skip_any
        if why is not None:
            return why
        if self.actions.get(c.name, c.default) == "off":
            return "turned off"
        if c.skip is not None:
            return c.skip(ctx)
        return None


def plan(ctx: Context) -> Plan:
    """The transaction's Plan, made on first use and whenever the identity changed."""
    p: Plan | None = ctx.cache.get(_PLAN)  # type: ignore[assignment]
    ident = ctx.identity
    if (p is None or p.customer is not ident.customer or p.by != ident.by
            or p.config is not ctx.config):
        p = ctx.cache[_PLAN] = Plan(ctx)
    return p


def skip_reason(c: HeaderCheck, ctx: Context) -> str | None:
    """Why the check does not apply here, or None when it does."""
    return plan(ctx).skip_reason(c, ctx)


async def evaluate(c: HeaderCheck, ctx: Context) -> Finding | None:
    out = c.fn(ctx)
    if c.is_async:
        out = await out  # type: ignore[misc]
    return out  # type: ignore[return-value]


def configured_action(c: HeaderCheck, ctx: Context) -> str:
    """The customer's override, else [headers.checks], else the check's default."""
    return plan(ctx).action(c)


def mode(ctx: Context) -> str:
    return plan(ctx).mode


def effective_action(c: HeaderCheck, ctx: Context) -> str:
    """Tag mode turns every refusal into a tag; "off" stays off."""
    p = plan(ctx)
    a = p.action(c)
    if a in ("reject", "tempfail") and p.mode == "tag":
        return "tag"
    return a


def outcome(c: HeaderCheck, ctx: Context, f: Finding) -> tuple[str, Verdict | None]:
    """What a finding leads to, without side effects: (action, verdict to answer)."""
    action = effective_action(c, ctx)
    if action in ("off", "tag"):
        return action, None
    reason = f"{f.reason} ({c.name})"
    if f.dns_error:
        return "tempfail", tempfail(451, "4.4.3", reason, c.name)
    status = f.status or c.status
    if action == "tempfail":
        return action, tempfail(451, "4" + status[1:], reason, c.name)
    return action, reject(f.code or c.code, status, reason, c.name, strike=c.strike)


def tag_value(c: HeaderCheck, ctx: Context, f: Finding) -> str:
    return f"rule={c.name} result=fail enforce={configured_action(c, ctx)}; {f.reason}"


def decide(c: HeaderCheck, ctx: Context, f: Finding) -> Verdict | None:
    """A finding into a verdict: refuse with an SMTP reply, or tag and let it pass."""
    action, verdict = outcome(c, ctx, f)
    if action == "tag":
        ctx.add_headers.append((VERDICT_HEADER, tag_value(c, ctx, f)))
        log.info("%s: tag: %s from %s: customer=%s from=<%s> rule=%s reason=%s",
                 ctx.session_id, ctx.stage.value, ctx.client.label, ctx.identity.name,
                 mlog.clean(ctx.sender.addr if ctx.sender else ""), c.name,
                 mlog.clean(f.reason, 300))
    return verdict


# --------------------------------------------------------------------------- helpers

_UNSAFE = re.compile(r"[^\x21-\x7e]")


def show(value: str, limit: int = 80) -> str:
    """An address or name as it may appear in a reply: printable ASCII, bounded."""
    s = _UNSAFE.sub("?", value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def own_names(ctx: Context) -> frozenset[str]:
    """Host names and domains that are ours: server.hostname, [postmaster] and
    [headers] own_names. Names without a dot (localhost) identify nobody."""
    p = plan(ctx)
    if p._own_names is None:
        c = ctx.config
        names = {c.server.hostname, *c.postmaster.hostnames, *c.postmaster.domains,
                 *p.settings.own_names}
        p._own_names = frozenset(n.lower().rstrip(".") for n in names if "." in n.strip("."))
    return p._own_names


def first(ctx: Context, name: str) -> str | None:
    """The first value of a header field, or None (as str(headers.get(name)))."""
    assert ctx.message is not None
    values = ctx.message.header_values.get(name.lower())
    return values[0] if values else None


_IP_CHARS = "0123456789."


def maybe_ip(text: str) -> bool:
    """False when ipaddress.ip_address(text) would certainly raise: an IPv4 address is
    ASCII digits and dots only, an IPv6 address (scoped or not) has a colon. Spares the
    two exceptions ip_address raises for every host name."""
    return ":" in text or (text != "" and not text.strip(_IP_CHARS))


# --------------------------------------------------------------------------- parsing

ADDRESS_FIELDS = ("from", "sender", "reply-to")
# `Display Name <local@domain>` or `local@domain` in plain ASCII atoms: most From: lines,
# parsed without the (slow) full RFC 5322 parser.
_ATOM_CHARS = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL = rf"{_ATOM_CHARS}(?:\.{_ATOM_CHARS})*"
_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.?"
_PLAIN_MAILBOX = re.compile(
    rf"^[ \t]*(?:([A-Za-z0-9 \t]*?)[ \t]*<({_LOCAL})@({_HOST})>|({_LOCAL})@({_HOST}))[ \t]*$")


MAX_ADDRESS_FIELD = 4096  # characters in one From:/Sender:/Reply-To:/... field
MAX_ENCODED_WORDS = 50  # RFC 2047 encoded words in one address field


def parse_mailboxes(headers: email.message.Message) -> dict[str, tuple[tuple[str, str, str], ...] | None]:
    """Each address field as ((display name, addr-spec, lower-case domain), ...), or None
    when present but malformed: there a mail program could show another address than
    the one checked (`a@x <b@y>`), so the message is refused rather than guessed at."""
    out: dict[str, tuple[tuple[str, str, str], ...] | None] = {}
    for name in ADDRESS_FIELDS:
        values = headers.get_all(name) or []
        if not values:
            continue
        boxes: list[tuple[str, str, str]] = []
        bad = False
        for value in values:
            text = str(value)
            m = _PLAIN_MAILBOX.match(text)
            if m:
                local, domain = m.group(2) or m.group(4), m.group(3) or m.group(5)
                boxes.append((" ".join((m.group(1) or "").split()), f"{local}@{domain}",
                              domain.lower().rstrip(".")))
                continue
            if len(text) > MAX_ADDRESS_FIELD or text.count("=?") > MAX_ENCODED_WORDS:
                # The stdlib parser needs memory quadratic in the encoded words: a few KB
                # of them cost hundreds of MB. No real address field looks like this.
                bad = True
                break
            try:
                h = email.policy.default.header_factory(name, text)
            except Exception:  # the stdlib parser on hostile input: malformed
                bad = True
                break
            if any(isinstance(d, email.errors.InvalidHeaderDefect) for d in h.defects):
                bad = True
                break
            for a in h.addresses:
                if not a.domain or not a.username:
                    bad = True
                boxes.append((a.display_name, a.addr_spec, a.domain.lower().rstrip(".")))
        out[name] = None if bad else tuple(boxes)
    return out


def decoded_values(headers: email.message.Message) -> dict[str, list[str]]:
    """Address field values with encoded words decoded (comments kept): what a reader sees."""
    out: dict[str, list[str]] = {}
    for name in ADDRESS_FIELDS:
        for value in headers.get_all(name) or []:
            text = str(value)
            if not text.isascii() or "=?" in text:
                with contextlib.suppress(Exception):
                    text = str(email.policy.default.header_factory("x-unstructured", text))
            out.setdefault(name, []).append(text)
    return out


# --------------------------------------------------------------------------- structure

_FIELD = re.compile(rb"^[!-9;-~]+[ \t]*:")


@check("header-syntax", Stage.DATA, scope="any", default="reject", code=550,
       status="5.6.0", summary="header lines are 'Name: value', ASCII unless SMTPUTF8, "
       "no NULs, at most 998 characters")
def header_syntax(ctx: Context) -> Finding | None:
    assert ctx.message is not None
    hb = ctx.message.header_block
    if b"\x00" in hb:
        return Finding("Message header contains a NUL character; remove it")
    if not hb.isascii() and not declares_smtputf8(ctx.mail_params):
        return Finding("Message header contains raw 8-bit characters: encode them "
                       "(RFC 2047) or send with SMTPUTF8")
    limit = settings(ctx).max_line_length
    for i, line in enumerate(hb.split(b"\r\n")[:-1], 1):
        if len(line) > limit:
            return Finding(f"Header line {i} is longer than {limit} characters; fold it "
                           "(RFC 5322 2.1.1)")
        if line[:1] in (b" ", b"\t"):
            if i == 1:
                return Finding("Message header starts with a continuation line")
        elif not _FIELD.match(line):
            return Finding(f"Header line {i} is not a 'Name: value' field; end the header "
                           "with an empty line before the body")
    return None


@check("from-missing", Stage.DATA, scope="any", default="reject", code=550,
       status="5.6.0", summary="a From: header is present (RFC 5322 3.6)")
def from_missing(ctx: Context) -> Finding | None:
    assert ctx.message is not None
    if ctx.message.field_counts.get("from", 0) == 0:
        return Finding("Message has no From: header; add one with your address")
    return None


@check("from-multiple", Stage.DATA, scope="any", default="reject", code=550,
       status="5.6.0", summary="exactly one From: field; several authors need a Sender:")
def from_multiple(ctx: Context) -> Finding | None:
    assert ctx.message is not None
    n = ctx.message.field_counts.get("from", 0)
    if n > 1:
        return Finding(f"Message has {n} From: headers; a message has exactly one")
    boxes = ctx.message.mailboxes.get("from")
    if boxes and len(boxes) > 1 and not ctx.message.field_counts.get("sender"):
        return Finding("From: names several authors but there is no Sender: header "
                       "(RFC 5322 3.6.2); add Sender: with the address that sends")
    return None


@check("from-invalid", Stage.DATA, scope="any", default="reject", code=550,
       status="5.6.0", summary="From: is a well-formed address that every reader parses alike")
def from_invalid(ctx: Context) -> Finding | None:
    assert ctx.message is not None
    if "from" not in ctx.message.mailboxes:
        return None
    boxes = ctx.message.mailboxes["from"]
    if not boxes:
        return Finding("From: header is not a valid address; write it as "
                       "\"Name <you@your-domain>\" or you@your-domain")
    return None


SINGLE_FIELDS = ("date", "sender", "reply-to", "to", "cc", "bcc", "message-id",
                 "in-reply-to", "references", "subject")


@check("header-duplicate", Stage.DATA, scope="any", default="reject", code=550,
       status="5.6.0", summary="at most one Date:, Sender:, Reply-To:, To:, Cc:, Bcc:, "
       "Message-ID:, In-Reply-To:, References:, Subject: (RFC 5322 3.6)")
def header_duplicate(ctx: Context) -> Finding | None:
    assert ctx.message is not None
    counts = ctx.message.field_counts
    dup = [f for f in SINGLE_FIELDS if counts.get(f, 0) > 1]
    if dup:
        names = ", ".join(_title(f) + ":" for f in dup)
        return Finding(f"Message has more than one {names}; each may appear only once")
    return None


def _title(name: str) -> str:
    return {"message-id": "Message-ID"}.get(name, "-".join(p.capitalize() for p in name.split("-")))


@check("date-missing", Stage.DATA, scope="any", default="reject", code=550,
       status="5.6.0", summary="a Date: header is present (RFC 5322 3.6.1)")
def date_missing(ctx: Context) -> Finding | None:
    if first(ctx, "Date") is None:
        return Finding("Message has no Date: header; add one (your mail program or "
                       "library can do it)")
    return None


def _date(ctx: Context) -> float | None:
    """The first Date: as a timestamp; None when absent or unparseable."""
    cache = ctx.notes.get("headers.date", "unset")
    if cache != "unset":
        return cache  # type: ignore[return-value]
    value = first(ctx, "Date")
    ts: float | None = None
    if value is not None:
        try:
            dt = parsedate_to_datetime(value)
            if dt.tzinfo is None:  # "-0000": UTC, origin time zone unknown (RFC 5322 3.3)
                dt = dt.replace(tzinfo=UTC)
            ts = dt.timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            ts = None
    ctx.notes["headers.date"] = ts
    return ts


@check("date-invalid", Stage.DATA, scope="any", default="reject", code=550,
       status="5.6.0", summary="Date: is an RFC 5322 date-time")
def date_invalid(ctx: Context) -> Finding | None:
    value = first(ctx, "Date")
    if value is not None and _date(ctx) is None:
        return Finding(f"Date: header {show(value.strip(), 60)!r} is not a valid RFC 5322 "
                       "date, such as 'Mon, 3 Jun 2024 14:05:00 +0200'")
    return None


def _span(seconds: float) -> str:
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds / 3600:g} hours"


@check("date-future", Stage.DATA, scope="any", default="reject", code=550,
       status="5.6.0", summary="Date: is not more than date_future (2 h) ahead")
def date_future(ctx: Context) -> Finding | None:
    ts = _date(ctx)
    limit = settings(ctx).date_future
    if ts is not None and ts - time.time() > limit:
        return Finding(f"Date: header is more than {_span(limit)} in the future; check the "
                       "clock and time zone of the sending computer")
    return None


@check("date-past", Stage.DATA, scope="any", default="tag", code=550,
       status="5.6.0", summary="Date: is not more than date_past (7 days) old")
def date_past(ctx: Context) -> Finding | None:
    ts = _date(ctx)
    limit = settings(ctx).date_past
    if ts is not None and time.time() - ts > limit:
        return Finding(f"Date: header is more than {_span(limit)} in the past; check the "
                       "clock of the sending computer")
    return None


@check("message-id-missing", Stage.DATA, scope="any", default="tag", code=550,
       status="5.6.0", summary="a Message-ID: header is present (RFC 5322 3.6.4: SHOULD)")
def message_id_missing(ctx: Context) -> Finding | None:
    if first(ctx, "Message-ID") is None:
        return Finding("Message has no Message-ID: header; add one")
    return None


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_MSGID = re.compile(rf'^\s*<({_DOT_ATOM}|"[^"\\\r\n]*")@({_DOT_ATOM}|\[[^\[\]\\\s]*\])>\s*$')


@check("message-id-invalid", Stage.DATA, scope="any", default="reject", code=550,
       status="5.6.0", summary="Message-ID: is <left@right> with a domain, not a bare IP, "
       "on the right")
def message_id_invalid(ctx: Context) -> Finding | None:
    value = first(ctx, "Message-ID")
    if value is None:
        return None
    m = _MSGID.match(value)
    if not m:
        return Finding(f"Message-ID: {show(value.strip(), 60)} is malformed; it must look "
                       "like <unique-part@your-domain>")
    right = m.group(2).strip("[]")
    if right.lower().startswith("ipv6:"):
        right = right[5:]
    if not maybe_ip(right):
        return None
    try:
        ipaddress.ip_address(right)
    except ValueError:
        return None
    return Finding(f"Message-ID: {show(value.strip(), 60)} has a bare IP address on the right "
                   "of '@'; use your domain name")


_COMMENT = re.compile(r"\([^()]*\)")
_BY = re.compile(r"(?:^|\s)by\s+([^\s;]+)", re.I)


def received_by(value: str) -> str:
    """The host a Received: line says received the message ('by' clause), lower case."""
    text = " ".join(value.split())
    for _ in range(3):  # nested comments, innermost first
        text = _COMMENT.sub(" ", text)
    m = _BY.search(text)
    return m.group(1).lower().rstrip(".") if m else ""


@check("received-forged", Stage.DATA, strike=True, scope="any", default="reject", code=550,
       status="5.7.1", summary="no Received: line from the client claims one of our host names")
def received_forged(ctx: Context) -> Finding | None:
    """The client's own topmost Received: line cannot have been written by us: the message
    has not passed us yet. (The one line our trusted upstream prepends, before-queue
    Postfix's, is skipped; older lines further down may be ours legitimately: mail that
    came in through us and is forwarded back out.)"""
    assert ctx.message is not None
    ours = own_names(ctx)
    customer = ctx.identity.customer if submitted(ctx) else None
    if customer is not None:  # a hosted customer's host may be named after its domain
        ours = frozenset(n for n in ours if not any(related(n, d) for d in customer.domains))
    if not ours:
        return None
    lines = ctx.message.header_values.get("received") or []
    i = 1 if ctx.client.trusted_peer and lines and received_by(lines[0]) in ours else 0
    if i < len(lines) and (host := received_by(lines[i])) in ours:
        return Finding(f"Received: header claims the message passed our server {host}, "
                       "which it did not; remove the forged Received: line")
    return None


# --------------------------------------------------------------------------- display name

_ADDR_IN_TEXT = re.compile(r"[^\s<>()\"',;:@\[\]]+@([^\s<>()\"',;:@\[\]]+)")
_DOMAIN_IN_TEXT = re.compile(
    r"(?<![\w@.-])((?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+([a-z]{2,63}))(?![\w@-]|\.\w)",
    re.I)


def related(a: str, b: str) -> bool:
    """Same domain, or one is a subdomain of the other (mail.acme.example ~ acme.example)."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


async def _tld_exists(tld: str) -> bool:
    from maild import dns as maild_dns

    r = await maild_dns.name_exists(tld)
    return r.ok


@check("display-name-spoof", Stage.DATA, strike=True, scope="any", default="reject", code=550,
       status="5.7.1", summary="the From: display name shows no address or domain other "
       "than the From address's own")
async def display_name_spoof(ctx: Context) -> Finding | None:
    """'"billing@bank.example" <x@customer.example>' shows the reader a bank. A mentioned
    domain counts only when its top-level domain exists in DNS ("J.R. Smith", "Dr.Who"
    are names); a lookup failure skips the mention rather than refusing on a guess."""
    assert ctx.message is not None
    boxes = ctx.message.mailboxes.get("from")
    if not boxes:
        return None
    own = {d for _, _, d in boxes}
    customer = ctx.identity.customer if submitted(ctx) else None
    if customer is not None:
        own.update(customer.domains)

    def foreign(domain: str) -> bool:
        d = domain.lower().rstrip(".")
        return not any(related(d, o) for o in own)

    for text in ctx.message.decoded_headers.get("from", []):
        for _, addr, _ in boxes:
            text = re.sub(re.escape(addr), " ", text, flags=re.I)
        text = unicodedata.normalize("NFKC", text)  # fullwidth ＠ and ． are @ and .
        if "@" in text:  # (an address needs an @, a domain a dot: most names have neither)
            for m in _ADDR_IN_TEXT.finditer(text):
                dom = m.group(1).rstrip(".")
                if "." in dom and foreign(dom):
                    return Finding(f"From: display name shows the address {show(m.group(0), 60)}, "
                                   f"which is not the From address; put only a name there")
            text = _ADDR_IN_TEXT.sub(" ", text)
        if "." not in text:
            continue
        for m in _DOMAIN_IN_TEXT.finditer(text):
            dom = m.group(1)
            if foreign(dom) and await _tld_exists(m.group(2).lower()):
                return Finding(f"From: display name shows the domain {show(dom, 60)}, which is "
                               "not the From address's domain; put only a name there")
    return None


def describe() -> list[dict[str, Any]]:
    """Every check, in pipeline order (its own stage's line in maild/policy/chain.py),
    for check-message and the docs."""
    from maild.policy.chain import CHAIN

    ordered = [c for stage in (Stage.MAIL, Stage.DATA) for r in CHAIN[stage]
               if (c := CHECKS.get(r.name)) is not None and c.stage is stage]
    return [{"name": c.name, "stage": c.stage.value, "scope": c.scope, "default": c.default,
             "reply": f"{c.code} {c.status}", "summary": c.summary} for c in ordered]
