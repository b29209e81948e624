"""The forged-header check framework: a check finds a problem, [headers] says what it
leads to (reject, tempfail, tag or off), and its pipeline rule applies that.

Each check has a name, a default action that [headers.checks] and a customer's
[customers.headers.checks] override, and a reason the sender can act on; in tag mode a
failed check adds an X-Maild-Verdict: line instead of refusing. Who is checked
(submitted by a customer, or anyone with apply_to = "all") is worked out once per
transaction in a Plan. The checks themselves are in structure.py and identity.py.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from maild import log as mlog
from maild.policy.context import Context, Stage
from maild.policy.headers import CHECK_ACTIONS, CustomerHeaders, settings
from maild.policy.rules import PolicyRule
from maild.policy.verdict import Verdict, reject, tempfail

log = logging.getLogger("maild.policy")

VERDICT_HEADER = "X-Maild-Verdict"
_DONE = "headers.done"  # ctx.notes key: {(check, customer)} already judged in this transaction


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
    def rule(self) -> PolicyRule:
        return _rules_for(self)[0]

    @property
    def recheck_rule(self) -> PolicyRule | None:
        return _rules_for(self)[1] if self.recheck else None


_RULES: dict[
    str, tuple[PolicyRule, PolicyRule]
] = {}  # check name -> (its rule, its DATA recheck rule)


def check(
    name: str,
    stage: Stage,
    *,
    scope: str,
    default: str,
    code: int,
    status: str,
    summary: str,
    recheck: bool = False,
    strike: bool = False,
    skip: Callable[[Context], str | None] | None = None,
) -> Callable[[CheckFn], HeaderCheck]:
    """Declare a check; `recheck`: a MAIL-stage check that runs again at DATA."""
    assert default in CHECK_ACTIONS and scope in ("customer", "any")
    assert not recheck or stage is Stage.MAIL

    def deco(fn: CheckFn) -> HeaderCheck:
        c = HeaderCheck(
            name,
            stage,
            scope,
            default,
            code,
            status,
            summary,
            fn,
            skip,
            inspect.iscoroutinefunction(fn),
            recheck,
            strike,
        )
        _DEFAULT_ACTIONS[name] = default
        return c

    return deco


def _rules_for(c: HeaderCheck) -> tuple[PolicyRule, PolicyRule]:
    rules = _RULES.get(c.name)
    if rules is None:
        fn = _rule_for(c)
        rules = _RULES[c.name] = (
            PolicyRule(c.name, c.stage, fn, c.is_async),
            PolicyRule(c.name, Stage.DATA, fn, c.is_async),
        )
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

    __slots__ = (
        "config",
        "customer",
        "by",
        "who",
        "settings",
        "submitted",
        "customer_headers",
        "mode",
        "actions",
        "skip_any",
        "skip_customer",
        "done",
        "_own_names",
    )
    skip_any: str | None
    skip_customer: str | None

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
            self.skip_any = (
                None
                if s.apply_to == "all"
                else 'not submitted by a customer (apply_to = "customers")'
            )
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
    if (
        p is None
        or p.customer is not ident.customer
        or p.by != ident.by
        or p.config is not ctx.config
    ):
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
        log.info(
            "%s: tag: %s from %s: customer=%s from=<%s> rule=%s reason=%s",
            ctx.session_id,
            ctx.stage.value,
            ctx.client.label,
            ctx.identity.name,
            mlog.clean(ctx.sender.addr if ctx.sender else ""),
            c.name,
            mlog.clean(f.reason, 300),
        )
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
        names = {
            c.server.hostname,
            *c.postmaster.hostnames,
            *c.postmaster.domains,
            *p.settings.own_names,
        }
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
