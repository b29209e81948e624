"""The structure checks (header syntax, From, Date, Message-ID, Received) and the
display-name check: what a well-formed message from its claimed origin looks like.

"Forging headers ... means sending email such that its origin appears to be another user
or machine, or a non-existent machine" (Demon AUP). Declared with @check (checks.py);
their place in the pipeline is chain.py's.
"""

from __future__ import annotations

import ipaddress
import re
import time
import unicodedata
from datetime import UTC
from email.utils import parsedate_to_datetime

from maild.address import declares_smtputf8
from maild.policy.checks import Finding, check, first, maybe_ip, own_names, show, submitted
from maild.policy.context import Context, Stage
from maild.policy.headers import settings

_FIELD = re.compile(rb"^[!-9;-~]+[ \t]*:")


@check(
    "header-syntax",
    Stage.DATA,
    scope="any",
    default="reject",
    code=550,
    status="5.6.0",
    summary="header lines are 'Name: value', ASCII unless SMTPUTF8, "
    "no NULs, at most 998 characters",
)
def header_syntax(ctx: Context) -> Finding | None:
    assert ctx.message is not None
    hb = ctx.message.header_block
    if b"\x00" in hb:
        return Finding("Message header contains a NUL character; remove it")
    if not hb.isascii() and not declares_smtputf8(ctx.mail_params):
        return Finding(
            "Message header contains raw 8-bit characters: encode them "
            "(RFC 2047) or send with SMTPUTF8"
        )
    limit = settings(ctx).max_line_length
    for i, line in enumerate(hb.split(b"\r\n")[:-1], 1):
        if len(line) > limit:
            return Finding(
                f"Header line {i} is longer than {limit} characters; fold it (RFC 5322 2.1.1)"
            )
        if line[:1] in (b" ", b"\t"):
            if i == 1:
                return Finding("Message header starts with a continuation line")
        elif not _FIELD.match(line):
            return Finding(
                f"Header line {i} is not a 'Name: value' field; end the header "
                "with an empty line before the body"
            )
    return None


@check(
    "from-missing",
    Stage.DATA,
    scope="any",
    default="reject",
    code=550,
    status="5.6.0",
    summary="a From: header is present (RFC 5322 3.6)",
)
def from_missing(ctx: Context) -> Finding | None:
    assert ctx.message is not None
    if ctx.message.field_counts.get("from", 0) == 0:
        return Finding("Message has no From: header; add one with your address")
    return None


@check(
    "from-multiple",
    Stage.DATA,
    scope="any",
    default="reject",
    code=550,
    status="5.6.0",
    summary="exactly one From: field; several authors need a Sender:",
)
def from_multiple(ctx: Context) -> Finding | None:
    assert ctx.message is not None
    n = ctx.message.field_counts.get("from", 0)
    if n > 1:
        return Finding(f"Message has {n} From: headers; a message has exactly one")
    boxes = ctx.message.mailboxes.get("from")
    if boxes and len(boxes) > 1 and not ctx.message.field_counts.get("sender"):
        return Finding(
            "From: names several authors but there is no Sender: header "
            "(RFC 5322 3.6.2); add Sender: with the address that sends"
        )
    return None


@check(
    "from-invalid",
    Stage.DATA,
    scope="any",
    default="reject",
    code=550,
    status="5.6.0",
    summary="From: is a well-formed address that every reader parses alike",
)
def from_invalid(ctx: Context) -> Finding | None:
    assert ctx.message is not None
    if "from" not in ctx.message.mailboxes:
        return None
    boxes = ctx.message.mailboxes["from"]
    if not boxes:
        return Finding(
            "From: header is not a valid address; write it as "
            '"Name <you@your-domain>" or you@your-domain'
        )
    return None


SINGLE_FIELDS = (
    "date",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "message-id",
    "in-reply-to",
    "references",
    "subject",
)


@check(
    "header-duplicate",
    Stage.DATA,
    scope="any",
    default="reject",
    code=550,
    status="5.6.0",
    summary="at most one Date:, Sender:, Reply-To:, To:, Cc:, Bcc:, "
    "Message-ID:, In-Reply-To:, References:, Subject: (RFC 5322 3.6)",
)
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


@check(
    "date-missing",
    Stage.DATA,
    scope="any",
    default="reject",
    code=550,
    status="5.6.0",
    summary="a Date: header is present (RFC 5322 3.6.1)",
)
def date_missing(ctx: Context) -> Finding | None:
    if first(ctx, "Date") is None:
        return Finding(
            "Message has no Date: header; add one (your mail program or library can do it)"
        )
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


@check(
    "date-invalid",
    Stage.DATA,
    scope="any",
    default="reject",
    code=550,
    status="5.6.0",
    summary="Date: is an RFC 5322 date-time",
)
def date_invalid(ctx: Context) -> Finding | None:
    value = first(ctx, "Date")
    if value is not None and _date(ctx) is None:
        return Finding(
            f"Date: header {show(value.strip(), 60)!r} is not a valid RFC 5322 "
            "date, such as 'Mon, 3 Jun 2024 14:05:00 +0200'"
        )
    return None


def _span(seconds: float) -> str:
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds / 3600:g} hours"


@check(
    "date-future",
    Stage.DATA,
    scope="any",
    default="reject",
    code=550,
    status="5.6.0",
    summary="Date: is not more than date_future (2 h) ahead",
)
def date_future(ctx: Context) -> Finding | None:
    ts = _date(ctx)
    limit = settings(ctx).date_future
    if ts is not None and ts - time.time() > limit:
        return Finding(
            f"Date: header is more than {_span(limit)} in the future; check the "
            "clock and time zone of the sending computer"
        )
    return None


@check(
    "date-past",
    Stage.DATA,
    scope="any",
    default="tag",
    code=550,
    status="5.6.0",
    summary="Date: is not more than date_past (7 days) old",
)
def date_past(ctx: Context) -> Finding | None:
    ts = _date(ctx)
    limit = settings(ctx).date_past
    if ts is not None and time.time() - ts > limit:
        return Finding(
            f"Date: header is more than {_span(limit)} in the past; check the "
            "clock of the sending computer"
        )
    return None


@check(
    "message-id-missing",
    Stage.DATA,
    scope="any",
    default="tag",
    code=550,
    status="5.6.0",
    summary="a Message-ID: header is present (RFC 5322 3.6.4: SHOULD)",
)
def message_id_missing(ctx: Context) -> Finding | None:
    if first(ctx, "Message-ID") is None:
        return Finding("Message has no Message-ID: header; add one")
    return None


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_MSGID = re.compile(rf'^\s*<({_DOT_ATOM}|"[^"\\\r\n]*")@({_DOT_ATOM}|\[[^\[\]\\\s]*\])>\s*$')


@check(
    "message-id-invalid",
    Stage.DATA,
    scope="any",
    default="reject",
    code=550,
    status="5.6.0",
    summary="Message-ID: is <left@right> with a domain, not a bare IP, on the right",
)
def message_id_invalid(ctx: Context) -> Finding | None:
    value = first(ctx, "Message-ID")
    if value is None:
        return None
    m = _MSGID.match(value)
    if not m:
        return Finding(
            f"Message-ID: {show(value.strip(), 60)} is malformed; it must look "
            "like <unique-part@your-domain>"
        )
    right = m.group(2).strip("[]")
    if right.lower().startswith("ipv6:"):
        right = right[5:]
    if not maybe_ip(right):
        return None
    try:
        ipaddress.ip_address(right)
    except ValueError:
        return None
    return Finding(
        f"Message-ID: {show(value.strip(), 60)} has a bare IP address on the right "
        "of '@'; use your domain name"
    )


_COMMENT = re.compile(r"\([^()]*\)")
_BY = re.compile(r"(?:^|\s)by\s+([^\s;]+)", re.I)


def received_by(value: str) -> str:
    """The host a Received: line says received the message ('by' clause), lower case."""
    text = " ".join(value.split())
    for _ in range(3):  # nested comments, innermost first
        text = _COMMENT.sub(" ", text)
    m = _BY.search(text)
    return m.group(1).lower().rstrip(".") if m else ""


@check(
    "received-forged",
    Stage.DATA,
    strike=True,
    scope="any",
    default="reject",
    code=550,
    status="5.7.1",
    summary="no Received: line from the client claims one of our host names",
)
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
        return Finding(
            f"Received: header claims the message passed our server {host}, "
            "which it did not; remove the forged Received: line"
        )
    return None


# --------------------------------------------------------------------------- display name

_ADDR_IN_TEXT = re.compile(r"[^\s<>()\"',;:@\[\]]+@([^\s<>()\"',;:@\[\]]+)")
_DOMAIN_IN_TEXT = re.compile(
    r"(?<![\w@.-])((?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+([a-z]{2,63}))(?![\w@-]|\.\w)", re.I
)


def related(a: str, b: str) -> bool:
    """Same domain, or one is a subdomain of the other (mail.acme.example ~ acme.example)."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


async def _tld_exists(tld: str) -> bool:
    from maild import dns as maild_dns

    r = await maild_dns.name_exists(tld)
    return r.ok


@check(
    "display-name-spoof",
    Stage.DATA,
    strike=True,
    scope="any",
    default="reject",
    code=550,
    status="5.7.1",
    summary="the From: display name shows no address or domain other than the From address's own",
)
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
                    return Finding(
                        f"From: display name shows the address {show(m.group(0), 60)}, "
                        f"which is not the From address; put only a name there"
                    )
            text = _ADDR_IN_TEXT.sub(" ", text)
        if "." not in text:
            continue
        for m in _DOMAIN_IN_TEXT.finditer(text):
            dom = m.group(1)
            if foreign(dom) and await _tld_exists(m.group(2).lower()):
                return Finding(
                    f"From: display name shows the domain {show(dom, 60)}, which is "
                    "not the From address's domain; put only a name there"
                )
    return None
