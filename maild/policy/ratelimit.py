"""Outbound rate limits per customer, login, client IP and envelope sender; mail bombing.

The sources: no unsolicited bulk mail, no mail bombing ("multiple emails, or one large
email"), no "excessive number of email connections to the same host". Limits come from
`[ratelimit]` (the default tier), named tiers `[ratelimit.tiers.NAME]` chosen by a
customer's `tier = "NAME"`, and a customer's own `[customers.ratelimit]` overrides.

Over a limit: 450 4.7.1 naming the limit and when it frees up, at RCPT (messages,
recipients, mail bombing) or at end of data (bytes), and a strike. Mail is charged only
when the downstream accepted it (see maild.antispam.limiter). Postmaster and abuse are
never limited: the postmaster rule ends the stage before this one runs.

Keys: `cust:NAME` (the customer's messages), `cust:NAME|rcpts`, `cust:NAME|bytes`,
`login:LOGIN`, `ip:ADDR`, `from:SENDER`, `rcpt:NAME|RECIPIENT` (per customer and
recipient, recipients normalised by case and plus-address tag, so one person is not
counted twice). The limiter keeps one counter per key and window (`cust:NAME#1h`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from maild.address import Address, canonical
from maild.antispam.limiter import Limiter, Over, Rate, Reservation
from maild.config import Config, Customer, Reader
from maild.policy.context import Context, Stage
from maild.policy.rules import on_finish, rule
from maild.policy.verdict import Verdict, tempfail

Rates = tuple[Rate, ...]


@dataclass(frozen=True)
class RateLimits:
    messages: Rates = (Rate.parse("200/1h"), Rate.parse("2000/1d"))
    recipients: Rates = (Rate.parse("500/1h"), Rate.parse("5000/1d"))
    bytes: Rates = (Rate.parse("500MB/1h"),)
    same_recipient: Rates = (Rate.parse("20/1h"),)
    recipients_per_message: int = 100
    connections_per_client: int = 20
    per_login: Rates = ()
    per_ip: Rates = ()
    per_sender: Rates = ()


@dataclass(frozen=True)
class RateLimitConfig:
    enabled: bool = True
    defaults: RateLimits = RateLimits()
    tiers: dict[str, RateLimits] | None = None
    # Unidentified clients (not a customer): limited per IP only when this is set.
    unidentified: RateLimits | None = None


_RATE_KEYS = (
    "messages",
    "recipients",
    "bytes",
    "same_recipient",
    "per_login",
    "per_ip",
    "per_sender",
)


def _rates(r: Reader, name: str, default: Rates) -> Rates:
    if not r.has(name):
        r.seen.add(name)
        return default
    raw = r.table.get(name)
    r.seen.add(name)
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        r.error(name, raw, 'a rate such as "200/1h" or a list of rates ["200/1h", "2000/1d"]')
        return default
    out = []
    for i, text in enumerate(items):
        try:
            out.append(Rate.parse(text))
        except ValueError:
            r.error(
                f"{name}[{i}]" if isinstance(raw, list) else name,
                text,
                'a rate COUNT/PERIOD such as "200/1h", "2000/1d" (bytes: "500MB/1h")',
            )
    return tuple(out)


def _limits(r: Reader, base: RateLimits) -> RateLimits:
    changes: dict[str, Any] = {}
    for k in _RATE_KEYS:
        if r.has(k):
            changes[k] = _rates(r, k, getattr(base, k))
    if r.has("recipients_per_message"):
        changes["recipients_per_message"] = r.int(
            "recipients_per_message", base.recipients_per_message, minimum=1
        )
    if r.has("connections_per_client"):
        changes["connections_per_client"] = r.int(
            "connections_per_client", base.connections_per_client, minimum=1
        )
    return replace(base, **changes)


def parse_ratelimit(r: Reader) -> RateLimitConfig:
    enabled = r.bool("enabled", True)
    defaults = _limits(r, RateLimits())
    tiers: dict[str, RateLimits] = {}
    tr = r.table_of("tiers")
    for name in list(tr.table):
        tier = tr.table_of(name)
        tiers[name] = _limits(tier, defaults)
        tier.unknown()
    unidentified = None
    if r.has("unidentified"):
        ur = r.table_of("unidentified")
        unidentified = _limits(
            ur, RateLimits(messages=(), recipients=(), bytes=(), same_recipient=())
        )
        ur.unknown()
    r.unknown()
    return RateLimitConfig(enabled, defaults, tiers, unidentified)


def parse_customer_ratelimit(r: Reader) -> dict[str, Any]:
    """A customer's `tier` and `[customers.ratelimit]` overrides (resolved lazily)."""
    tier = r.str("tier", "")
    overrides: dict[str, Any] = {}
    if r.has("ratelimit"):
        sub = r.table_of("ratelimit")
        given = _limits(sub, RateLimits())
        overrides = {f.name: getattr(given, f.name) for f in fields(RateLimits) if sub.has(f.name)}
        sub.unknown()
    return {"tier": tier, "overrides": overrides or {}}


def section(ctx: Context) -> RateLimitConfig:
    return ctx.config.sections.get("ratelimit") or RateLimitConfig()


def limits_for(ctx: Context) -> RateLimits | None:
    """The limits that apply to this transaction's sender, or None for no limits."""
    return customer_limits(ctx.config, ctx.identity.customer)


def customer_limits(config: Config, c: Customer | None) -> RateLimits | None:
    """A customer's limits (its tier, then its overrides); for None, the unidentified ones."""
    rl = config.sections.get("ratelimit") or RateLimitConfig()
    if c is None:
        return rl.unidentified
    ext = c.ext.get("ratelimit") or {"tier": "", "overrides": {}}
    base = rl.defaults
    if ext["tier"]:
        base = (rl.tiers or {}).get(ext["tier"], base)
    return replace(base, **ext["overrides"]) if ext["overrides"] else base


_CUSTOMER_KEYS = {"messages": "cust:{}", "recipients": "cust:{}|rcpts", "bytes": "cust:{}|bytes"}


def customer_key(kind: str, name: str) -> str:
    """The key a customer's messages, recipients or bytes are counted at (per window)."""
    return _CUSTOMER_KEYS[kind].format(name)


def _reservation(ctx: Context) -> Reservation:
    res = ctx.notes.get("ratelimit")
    if res is None:
        res = ctx.notes["ratelimit"] = Reservation()
    return res  # type: ignore[return-value]


def _refuse(over: Over) -> Verdict:
    mins = max(1, int(over.retry_after + 59) // 60)
    return tempfail(
        450,
        "4.7.1",
        f"Rate limit {over.name} ({over.rate.text}) exceeded; "
        f"try again in {mins} minute{'s' if mins != 1 else ''}",
        "ratelimit",
        strike=True,
    )


def _sender_checks(
    ctx: Context, lim: RateLimits, n_msgs: float
) -> list[tuple[str, str, Rate, float]]:
    """Per-message counters for this transaction's sender keys."""
    checks = []
    c = ctx.identity.customer
    if c is not None:
        checks += [("messages", customer_key("messages", c.name), r, n_msgs) for r in lim.messages]
    if ctx.identity.login:
        checks += [
            ("per_login", f"login:{ctx.identity.login.lower()}", r, n_msgs) for r in lim.per_login
        ]
    checks += [("per_ip", f"ip:{ctx.client.addr}", r, n_msgs) for r in lim.per_ip]
    if ctx.sender is not None and not ctx.sender.is_null:
        checks += [
            ("per_sender", f"from:{canonical(ctx.sender.addr)}", r, n_msgs) for r in lim.per_sender
        ]
    return checks


def _rcpt_checks(
    ctx: Context, lim: RateLimits, rcpts: list[Address]
) -> list[tuple[str, str, Rate, float]]:
    name = ctx.identity.name
    checks: list[tuple[str, str, Rate, float]] = []
    if ctx.identity.customer is not None:
        checks += [
            ("recipients", customer_key("recipients", name), r, float(len(rcpts)))
            for r in lim.recipients
        ]
        for a in rcpts:
            checks += [
                ("same_recipient", f"rcpt:{name}|{canonical(a.addr)}", r, 1.0)
                for r in lim.same_recipient
            ]
    return checks


def _active(ctx: Context) -> tuple[Limiter, RateLimits] | None:
    """(limiter, limits) when rate limiting applies to this transaction."""
    limiter = ctx.services.limiter
    if limiter is None or not section(ctx).enabled:
        return None
    lim = limits_for(ctx)
    return None if lim is None else (limiter, lim)


@rule(Stage.RCPT, "ratelimit")
async def ratelimit_rcpt(ctx: Context) -> Verdict | None:
    if (active := _active(ctx)) is None:
        return None
    limiter, lim = active
    assert ctx.rcpt is not None
    if len(ctx.recipients) >= lim.recipients_per_message:
        return tempfail(
            452,
            "4.5.3",
            f"Too many recipients: at most {lim.recipients_per_message} "
            "per message for your account; send the rest in another message",
            "recipients-per-message",
        )
    sessions = ctx.services.sessions
    if sessions is not None and ctx.identity.customer is not None:
        n = sessions.clients.get(ctx.client.addr, 0)
        if n > lim.connections_per_client:
            return tempfail(
                450,
                "4.7.1",
                f"Too many concurrent connections from {ctx.client.addr} "
                f"({n}, limit {lim.connections_per_client}); use fewer parallel "
                "sessions",
                "ratelimit",
                strike=True,
            )
    first = not ctx.notes.get("ratelimit-msg")
    checks = _rcpt_checks(ctx, lim, [ctx.rcpt])
    if first:
        checks = _sender_checks(ctx, lim, 1.0) + checks
    over = await limiter.try_reserve_async(_reservation(ctx), checks)
    if over is not None:
        return _refuse(over)
    ctx.notes["ratelimit-msg"] = True
    ctx.notes["ratelimit-who"] = (ctx.identity.name, ctx.identity.login)
    return None


@rule(Stage.DATA, "ratelimit")
async def ratelimit_data(ctx: Context) -> Verdict | None:
    if (active := _active(ctx)) is None:
        return None
    limiter, lim = active
    res = _reservation(ctx)
    checks: list[tuple[str, str, Rate, float]] = []
    if ctx.notes.get("ratelimit-who") != (ctx.identity.name, ctx.identity.login):
        # The login arrived at end of data (before-queue mode): charge everything now,
        # under the identity it revealed.
        limiter.release(res)
        res = ctx.notes["ratelimit"] = Reservation()
        checks += _sender_checks(ctx, lim, 1.0) + _rcpt_checks(ctx, lim, ctx.recipients)
    if ctx.identity.customer is not None and ctx.message is not None:
        checks += [
            ("bytes", customer_key("bytes", ctx.identity.name), r, float(ctx.message.size))
            for r in lim.bytes
        ]
    over = await limiter.try_reserve_async(res, checks)
    return _refuse(over) if over is not None else None


@on_finish
def ratelimit_finish(ctx: Context, accepted: bool) -> None:
    res = ctx.notes.get("ratelimit")
    limiter = ctx.services.limiter
    if not isinstance(res, Reservation) or limiter is None:
        return
    if accepted:
        limiter.commit(res)
    else:
        limiter.release(res)
