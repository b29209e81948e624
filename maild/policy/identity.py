"""Who the message says it is from must be the customer who sends it, on a machine that exists.

Ownership: MAIL FROM, From:, Sender:, Reply-To: and Return-Path: must be addresses or
domains of the submitting customer (its domains and their subdomains, its extra
addresses, the return paths, unsubscribe and confirm+TOKEN@ addresses of its registered
lists) or be covered by a `permitted` entry recording who granted the permission
("It is also forgery to arrange for replies ... to be sent to other users ... if prior
permission has been granted ... there is no problem"). Postfix checks only the envelope
(reject_sender_login_mismatch, skipped for MAIL FROM:<>) and never header From:.

The null reverse path is allowed ("of course null reverse paths can be used") but only for
what looks like a bounce or an auto-reply, and at a small rate per customer.

Non-existent machines: the envelope sender's and From: domains must resolve (MX, else A or
AAAA; DNS failure is a 451, NXDOMAIN a 550) unless we receive mail for them ([postmaster]
domains and hostnames), and the HELO name must be a real host name or the client's own
address literal, never one of ours.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from maild import config as cfg
from maild import dns as maild_dns
from maild import log as mlog
from maild.address import PathError, canonical, parse_path
from maild.antispam.limiter import Reservation
from maild.config import Customer
from maild.optin.registry import Registry
from maild.optin.settings import section as optin_section
from maild.policy.checks import Finding, check, maybe_ip, own_names, show, submitted
from maild.policy.context import Context, Stage
from maild.policy.headers import settings
from maild.policy.rules import on_finish

if TYPE_CHECKING:
    from maild.optin.service import OptinService

log = logging.getLogger("maild.policy")

# Where a permitted address may appear.
FIELDS = ("envelope", "from", "sender", "reply-to", "return-path")


# --------------------------------------------------------------------------- permitted


@dataclass(frozen=True)
class Permit:
    """Permission, granted by the owner of an address or domain, to use it."""

    address: str  # canonical full address, or ""
    domain: str  # a domain (and its subdomains), or ""
    granted_by: str  # who granted it, and how it is recorded (ticket, letter)
    fields: frozenset[str]
    note: str = ""

    def covers(self, addr: str, domain: str) -> bool:
        if self.address:
            return canonical(addr) == self.address
        return domain == self.domain or domain.endswith("." + self.domain)


def parse_permitted(r: cfg.Reader) -> tuple[Permit, ...]:
    out = []
    for p in r.tables("permitted"):
        address = p.str("address", "").strip().lower()
        domain = p.str("domain", "").strip().lower().rstrip(".")
        granted_by = p.str("granted_by", "").strip()
        fields = p.str_list("fields", FIELDS, lower=True)
        note = p.str("note", "")
        if bool(address) == bool(domain):
            p.problems.append(
                f'{p.prefix}: give exactly one of address = "user@domain" or domain = "domain"'
            )
        if address and ("@" not in address or not cfg.is_hostname(address.rpartition("@")[2])):
            p.error("address", address, 'a full address such as "billing@partner.example"')
        if domain and not cfg.is_hostname(domain):
            p.error("domain", domain, 'a domain name such as "partner.example"')
        if not granted_by:
            p.problems.append(
                f"{p.key('granted_by')} is missing: say who granted the "
                'permission and where it is recorded, e.g. "J. Smith, '
                'partner.example, ticket 4711"'
            )
        for i, f in enumerate(fields):
            if f not in FIELDS:
                p.error(f"fields[{i}]", f, "one of " + ", ".join(f'"{x}"' for x in FIELDS))
        p.unknown()
        out.append(
            Permit(
                canonical(address) if address else "", domain, granted_by, frozenset(fields), note
            )
        )
    return tuple(out)


def _domain_of(addr: str) -> str:
    d = addr.rpartition("@")[2].strip().lower().rstrip(".")
    if d and not d.isascii():
        with contextlib.suppress(UnicodeError):
            d = d.encode("idna").decode("ascii")
    return d


# (customer name, address) -> why the address is one of that customer's registered lists'
ListAddresses = Callable[[str, str], "str | None"]


def lists_of(config: cfg.Config, svc: OptinService | None = None) -> ListAddresses:
    """The registered lists' addresses: the running daemon's opt-in service's
    (policies.toml and the store, with its confirmation tokens), else those in
    policies.toml (check-message, tests)."""
    if svc is not None:
        return functools.partial(svc.list_address, config)
    s = optin_section(config)
    reg = Registry.build(s, [])
    return lambda customer, addr: reg.address_of(
        customer, addr, s.confirm_local_part, lambda token: None
    )


def owner_of(
    customer: Customer, addr: str, where: str, lists: ListAddresses | None = None
) -> str | None:
    """Why `addr` may be used by the customer in `where`, or None when it may not.

    The one ownership lookup of every check: "domain acme.example", "address
    news@partner.example", "return path of list news.acme.example" (or "unsubscribe
    address", "confirmation address"), or "permitted by <who>"."""
    domain = _domain_of(addr)
    if "@" not in addr or not domain:
        return None
    for d in customer.domains:
        if domain == d or domain.endswith("." + d):
            return f"domain {d}"
    canon = canonical(addr)
    if any(canonical(a) == canon for a in customer.addresses):
        return f"address {canon}"
    if lists is not None and (why := lists(customer.name, addr)):
        return why
    for p in customer.ext.get("permitted", ()):
        if where in p.fields and p.covers(addr, domain):
            return f"permitted by {p.granted_by}"
    return None


def _yours(customer: Customer) -> str:
    doms = list(customer.domains[:3]) + (["..."] if len(customer.domains) > 3 else [])
    return f" ({', '.join(doms)})" if doms else " (none are recorded: ask support to add yours)"


def _not_yours(ctx: Context, what: str, addr: str, where: str) -> Finding | None:
    customer = ctx.identity.customer
    assert customer is not None
    why = owner_of(customer, addr, where, lists_of(ctx.config, ctx.services.optin))
    if why is None:
        return Finding(
            f"{what} <{show(addr)}> is not an address of yours: send from your "
            f"domains{_yours(customer)}, or ask support to record the owner's "
            "permission"
        )
    if why.startswith("permitted"):
        log.info(
            "%s: permitted: customer=%s field=%s address=<%s> %s",
            ctx.session_id,
            customer.name,
            where,
            mlog.clean(addr),
            mlog.clean(why, 300),
        )
    return None


# --------------------------------------------------------------------------- envelope


@check(
    "envelope-owner",
    Stage.MAIL,
    strike=True,
    recheck=True,
    scope="customer",
    default="reject",
    code=553,
    status="5.7.1",
    summary="MAIL FROM is an address or domain of the customer (or permitted)",
)
def envelope_owner(ctx: Context) -> Finding | None:
    s = ctx.sender
    if s is None or s.is_null:
        return None  # the null reverse path: see null-sender
    if not s.domain or s.domain.startswith("["):
        return Finding(
            f"Sender address <{show(s.addr)}> has no domain name: send with a "
            "full address at one of your domains"
        )
    return _not_yours(ctx, "Sender address", s.addr, "envelope")


async def mail_domain(ctx: Context, domain: str) -> maild_dns.Lookup:
    """maild.dns.mail_domain, except for a domain or host name we receive mail for: replies
    reach it by definition, so it needs no lookup (Postfix's reject_unknown_sender_domain
    skips domains it is the final destination for). Its subdomains are looked up."""
    if domain.lower().rstrip(".") in ctx.config.hosted_domains:
        return maild_dns.Lookup("ok", f"{domain} is hosted here")
    return await maild_dns.mail_domain(domain)


def _domain_finding(what: str, domain: str, r: maild_dns.Lookup) -> Finding | None:
    if r.status == "ok":
        return None
    if r.status == "error":
        return Finding(
            f"Cannot check the {what} domain {show(domain)} in DNS right now "
            f"({r.detail}); try again later",
            dns_error=True,
        )
    if r.status == "nullmx":
        return Finding(
            f"The {what} domain {show(domain)} publishes a null MX: it receives no "
            "mail, so replies and bounces cannot reach you; send from a domain "
            "that receives mail",
            status="5.7.27",
        )
    return Finding(
        f"The {what} domain {show(domain)} does not exist in DNS (no MX, A or AAAA "
        "record): replies cannot reach it; fix the address or the domain's DNS"
    )


@check(
    "sender-domain-unknown",
    Stage.MAIL,
    recheck=True,
    scope="any",
    default="reject",
    code=550,
    status="5.1.8",
    summary="the MAIL FROM domain resolves (MX, else A/AAAA; not a null MX)",
)
async def sender_domain_unknown(ctx: Context) -> Finding | None:
    s = ctx.sender
    if s is None or s.is_null or not s.domain or s.domain.startswith("["):
        return None
    return _domain_finding("sender", s.domain, await mail_domain(ctx, s.domain))


# --------------------------------------------------------------------------- HELO

HELO_CHECKS = ("helo-invalid", "helo-ours")  # they judge only the HELO/EHLO name


def _helo_skip(ctx: Context) -> str | None:
    if ctx.identity.by == "login" and not settings(ctx).helo_for_logins:
        return "authenticated login (helo_for_logins = false)"
    return None


def helo_problem(helo: str, client_addr: str) -> str | None:
    """What is wrong with a HELO name, or None: an FQDN, or the client's address literal."""
    h = helo.strip()
    if not h:
        return "No HELO/EHLO name was given; greet with your host's fully qualified name"
    if h.startswith("[") and h.endswith("]"):
        lit = h[1:-1]
        lit = lit[5:] if lit.lower().startswith("ipv6:") else lit
        try:
            ip = ipaddress.ip_address(lit)
        except ValueError:
            return f"HELO {show(h)} is not a valid address literal"
        try:
            client = ipaddress.ip_address(client_addr)
        except ValueError:
            return None
        if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:
            client = client.ipv4_mapped
        if ip != client:
            return (
                f"HELO {show(h)} is not your address [{show(client_addr)}]; greet with "
                "your host's name or your real address"
            )
        return None
    if maybe_ip(h):  # (a host name never is one: spare ip_address its exceptions)
        try:
            ipaddress.ip_address(h)
            return f"HELO {show(h)} is a bare IP address; write it as [{show(h)}] or use your host's name"
        except ValueError:
            pass
    name = h.rstrip(".")
    if not cfg.is_hostname(name) or name.rpartition(".")[2].isdigit():
        return f"HELO {show(h)} is not a valid host name"
    if "." not in name:
        return (
            f"HELO {show(h)} is not a fully qualified host name; greet with a name "
            "such as host.your-domain"
        )
    return None


@check(
    "helo-invalid",
    Stage.MAIL,
    recheck=True,
    scope="any",
    default="reject",
    code=550,
    status="5.5.2",
    skip=_helo_skip,
    summary="HELO is a fully qualified host name or the client's own [address]",
)
def helo_invalid(ctx: Context) -> Finding | None:
    problem = helo_problem(ctx.client.helo, ctx.client.addr)
    return Finding(problem) if problem else None


@check(
    "helo-ours",
    Stage.MAIL,
    strike=True,
    recheck=True,
    scope="any",
    default="reject",
    code=550,
    status="5.7.1",
    summary="HELO does not claim one of our host names or domains",
)
def helo_ours(ctx: Context) -> Finding | None:
    name = ctx.client.helo.strip().lower().rstrip(".")
    if not name or name not in own_names(ctx):
        return None
    customer = ctx.identity.customer if submitted(ctx) else None
    if customer is not None and any(name == d or name.endswith("." + d) for d in customer.domains):
        return None  # a hosted customer's own domain is also theirs
    return Finding(f"HELO {show(name)} is our own host name; greet with your own host's name")


# --------------------------------------------------------------------------- null sender

_AUTO_SUBJECT = re.compile(
    r"^\s*(undeliver|delivery (status|failure|notification)|mail delivery (failed|failure)|"
    r"returned mail|failure notice|non[- ]?delivery|auto(matic)?[- ]?(reply|response)|auto:|"
    r"out of (the )?office|vacation|away from|read:|delivered:|abwesenheit)",
    re.I,
)


def looks_automatic(ctx: Context) -> bool:
    """A bounce (DSN), a receipt (MDN) or an auto-reply (RFC 3834), judged on headers only."""
    assert ctx.message is not None
    values = ctx.message.header_values

    def get(name: str) -> str:  # the first value, as str(headers.get(name, ""))
        v = values.get(name)
        return v[0] if v else ""

    if get("content-type").lower().startswith("multipart/report"):
        return True
    auto = get("auto-submitted").strip().lower()
    if auto and not auto.startswith("no"):
        return True
    if "x-autoreply" in values or "x-autorespond" in values:
        return True
    if get("precedence").strip().lower() == "auto_reply":
        return True
    for _, addr, _ in ctx.message.mailboxes.get("from") or ():
        if addr.partition("@")[0].lower() in ("mailer-daemon", "postmaster"):
            return True
    return bool(_AUTO_SUBJECT.match(get("subject")))


@check(
    "null-sender",
    Stage.DATA,
    strike=True,
    scope="customer",
    default="reject",
    code=550,
    status="5.7.1",
    summary="MAIL FROM:<> only for bounces, receipts and auto-replies",
)
def null_sender(ctx: Context) -> Finding | None:
    if ctx.sender is None or not ctx.sender.is_null or looks_automatic(ctx):
        return None
    return Finding(
        "The null sender <> is only for bounces and auto-replies (this message is "
        "neither); send it from your own address"
    )


@check(
    "null-sender-rate",
    Stage.DATA,
    scope="customer",
    default="tempfail",
    code=550,
    status="5.7.1",
    summary="at most null_sender_rate messages with MAIL FROM:<> per customer",
)
async def null_sender_rate(ctx: Context) -> Finding | None:
    """Counted in the shared rate limiter (persistent, charged only once delivered)."""
    limiter = ctx.services.limiter
    if ctx.sender is None or not ctx.sender.is_null or limiter is None:
        return None
    rate = settings(ctx).null_sender_rate
    key = f"null-sender:{ctx.identity.name}"
    if ctx.notes.get("dry-run"):
        wait = await limiter.check_async(key, rate)
    else:
        res = ctx.notes.setdefault(_NULL_RES, Reservation())
        assert isinstance(res, Reservation)
        over = await limiter.try_reserve_async(res, [("null-sender", key, rate, 1.0)])
        wait = over.retry_after if over is not None else None
    if wait is None:
        return None
    mins = max(1, int(wait + 59) // 60)
    return Finding(
        f"Too many messages with the null sender <> (limit {rate.text}); try again "
        f"in {mins} minute{'s' if mins != 1 else ''}, and look for a bounce or "
        "auto-reply loop"
    )


_NULL_RES = "headers.null-sender"


@on_finish
def null_sender_finish(ctx: Context, accepted: bool) -> None:
    res = ctx.notes.get(_NULL_RES)
    limiter = ctx.services.limiter
    if isinstance(res, Reservation) and limiter is not None:
        (limiter.commit if accepted else limiter.release)(res)


# --------------------------------------------------------------------------- header fields


def _field_owner(ctx: Context, field: str, label: str) -> Finding | None:
    assert ctx.message is not None
    if field not in ctx.message.mailboxes:
        return None
    boxes = ctx.message.mailboxes[field]
    if not boxes:
        return Finding(
            f"{label}: header is malformed, so its owner cannot be checked; write "
            'it as "Name <you@your-domain>"'
        )
    for _, addr, _ in boxes:
        f = _not_yours(ctx, f"{label}: address", addr, field)
        if f is not None:
            return f
    return None


@check(
    "from-owner",
    Stage.DATA,
    strike=True,
    scope="customer",
    default="reject",
    code=550,
    status="5.7.1",
    summary="every From: address is the customer's (or permitted)",
)
def from_owner(ctx: Context) -> Finding | None:
    return _field_owner(ctx, "from", "From")


@check(
    "sender-owner",
    Stage.DATA,
    strike=True,
    scope="customer",
    default="reject",
    code=550,
    status="5.7.1",
    summary="the Sender: address is the customer's (or permitted)",
)
def sender_owner(ctx: Context) -> Finding | None:
    return _field_owner(ctx, "sender", "Sender")


@check(
    "reply-to-owner",
    Stage.DATA,
    strike=True,
    scope="customer",
    default="reject",
    code=550,
    status="5.7.1",
    summary="every Reply-To: address is the customer's (or permitted)",
)
def reply_to_owner(ctx: Context) -> Finding | None:
    return _field_owner(ctx, "reply-to", "Reply-To")


@check(
    "return-path-owner",
    Stage.DATA,
    strike=True,
    scope="customer",
    default="reject",
    code=550,
    status="5.7.1",
    summary="a Return-Path: in a submitted message is <> or the customer's",
)
def return_path_owner(ctx: Context) -> Finding | None:
    assert ctx.message is not None
    for value in ctx.message.header_values.get("return-path") or ():
        v = " ".join(value.split())
        try:
            path = parse_path(v if v.startswith("<") else f"<{v}>")
        except PathError:
            return Finding(
                f"Return-Path: {show(v, 60)} is malformed; remove it (the "
                "receiving system adds Return-Path:)"
            )
        if path.is_null:
            continue
        f = _not_yours(ctx, "Return-Path: address", path.addr, "return-path")
        if f is not None:
            return f
    return None


@check(
    "from-domain-unknown",
    Stage.DATA,
    scope="any",
    default="reject",
    code=550,
    status="5.1.8",
    summary="each From: domain resolves (MX, else A/AAAA; not a null MX)",
)
async def from_domain_unknown(ctx: Context) -> Finding | None:
    assert ctx.message is not None
    seen: set[str] = set()
    for _, _, domain in ctx.message.mailboxes.get("from") or ():
        if not domain or domain in seen or domain.startswith("["):
            continue
        seen.add(domain)
        f = _domain_finding("From:", domain, await mail_domain(ctx, domain))
        if f is not None:
            return f
    return None
