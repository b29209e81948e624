"""SMTP paths as clients send them, and where such an address would really go.

aiosmtpd hands handlers a cleaned address: `<@route:u@d>` loses its route and
`<"a%b">` its quotes. Relay decisions must see what Postfix will see, so maild keeps the
raw argument and judges every domain an address could be routed to: the source route's
hosts, the percent hack (`u%D@S`, Postfix's allow_percent_hack), bang paths (`D!u`,
swap_bangpath), an `@` hidden in a quoted local part (resolve_dequoted_address) and
extra `@`s. An address is "local" only when every one of those is a hosted domain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ESMTP parameter keyword=value (RFC 5321 4.1.2: esmtp-keyword / esmtp-value).
_PARAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*(=[\x21-\x3c\x3e-\x7e\x80-\U0010ffff]+)?$")
_CTRL = re.compile(r"[\x00-\x1f\x7f]")


class PathError(ValueError):
    """The argument of MAIL/RCPT is not a syntactically valid path."""


@dataclass(frozen=True, slots=True)
class Address:
    """One reverse-path or forward-path, raw and dissected."""

    raw: str  # the path as received, with its angle brackets if it had them
    route: tuple[str, ...]  # source-route hosts, lower case, without '@'
    local: str  # local part with quoting removed (case kept)
    domain: str  # lower case, trailing dot removed; "" when unqualified
    quoted: bool  # the local part was a quoted string

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain and not self.route

    @property
    def addr(self) -> str:
        """local@domain (or the bare local part), as a log and a key would show it."""
        if self.is_null:
            return ""
        return f"{self.local}@{self.domain}" if self.domain else self.local

    def destinations(self) -> frozenset[str]:
        """Every domain this address could be routed to, by any reading of it.

        The final domain, each source-route host, and whatever hides in the local part
        behind '@', '%' or '!'. An unqualified address gives "" (resolved locally).
        """
        out = set(self.route)
        out.add(self.domain)
        local = self.local
        # An '@' hidden in a quoted local part ("u@D"@S) or a second '@' (u@D@S).
        parts = local.split("@")
        for p in parts[1:]:
            out.add(_norm_domain(p))
        local = parts[0]
        # Percent hack: u%D%E -> every segment after the first is a hop.
        segs = local.split("%")
        for s in segs[1:]:
            out.add(_norm_domain(s))
        local = segs[0]
        # Bang path: D!E!u -> every segment before the last is a hop.
        bang = local.split("!")
        for s in bang[:-1]:
            out.add(_norm_domain(s))
        return frozenset(out)

    def is_local_to(self, hosted: frozenset[str]) -> bool:
        """True when every reading of the address ends at a hosted domain."""
        dests = self.destinations()
        return all(d in hosted for d in dests)


def _norm_domain(d: str) -> str:
    return d.strip().rstrip(".").lower()


def split_arg(arg: str) -> tuple[str, str]:
    """Split 'FROM:'/'TO:' argument remainder into (path, parameters)."""
    s = arg.lstrip()
    if s.startswith("<"):
        end = _closing_bracket(s)
        return s[: end + 1], s[end + 1 :].strip()
    # RFC 5321 wants angle brackets; tolerate a bare address as Postfix does.
    path, _, params = s.partition(" ")
    return path, params.strip()


def _closing_bracket(s: str) -> int:
    if '"' in s:
        return _scan_closing_bracket(s)
    end = s.find(">")  # no quoted string, so no escape either: the first ">" closes it
    if end < 0:
        raise PathError("unterminated <address>")
    return end


def _scan_closing_bracket(s: str) -> int:
    in_quote = escaped = False
    for i, ch in enumerate(s):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quote:
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == ">" and not in_quote:
            return i
    raise PathError("unterminated <address>")


def parse_path(path: str) -> Address:
    """Parse one SMTP path (`<...>`, or a bare address) without losing anything."""
    raw = path
    inner = path[1:-1] if path.startswith("<") and path.endswith(">") else path
    if _CTRL.search(inner):
        # Never valid in a path (RFC 5321 4.1.2), and the downstream client refuses them.
        raise PathError("control characters in address")
    if inner == "":
        return Address(raw=raw, route=(), local="", domain="", quoted=False)
    route: tuple[str, ...] = ()
    if inner.startswith("@"):
        # Source route "@a,@b:mailbox" (RFC 5321 4.1.2, obsolete but still parsed).
        head, sep, rest = inner.partition(":")
        if not sep:
            raise PathError("source route without ':'")
        hops = [h.strip() for h in head.split(",")]
        if not all(h.startswith("@") and len(h) > 1 for h in hops):
            raise PathError("malformed source route")
        route = tuple(_norm_domain(h[1:]) for h in hops)
        inner = rest
    local, domain, quoted = _split_mailbox(inner)
    if len(local) > 256 or len(domain) > 255:
        raise PathError("address too long")
    return Address(raw=raw, route=route, local=local, domain=_norm_domain(domain), quoted=quoted)


def _split_mailbox(s: str) -> tuple[str, str, bool]:
    """Split 'local@domain' where local may be a quoted string containing '@'."""
    if s.startswith('"'):
        i, buf, escaped = 1, [], False
        while i < len(s):
            ch = s[i]
            if escaped:
                buf.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                break
            else:
                buf.append(ch)
            i += 1
        else:
            raise PathError("unterminated quoted local part")
        rest = s[i + 1 :]
        if rest and not rest.startswith("@"):
            raise PathError("text after quoted local part")
        return "".join(buf), rest[1:], True
    local, at, domain = s.rpartition("@")
    if not at:
        return s, "", False
    if not local:
        raise PathError("empty local part")
    return local, domain, False


def parse_params(params: str) -> list[str]:
    """ESMTP parameters as a list of 'KEY=value' strings; raise PathError if malformed."""
    out = params.split()
    for p in out:
        if not _PARAM.match(p) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in p):
            raise PathError(f"malformed parameter {p[:40]!r}")
    return out


def declares_smtputf8(mail_params: list[str]) -> bool:
    """MAIL FROM carried SMTPUTF8 (RFC 6531 3.4): the transaction may use UTF-8."""
    return any(p.upper() == "SMTPUTF8" for p in mail_params)


def eight_bit(text: str) -> str | None:
    """None for ASCII text, "utf-8" for valid UTF-8, "malformed" otherwise.

    aiosmtpd decodes command arguments as UTF-8 with surrogateescape, so a byte that is
    not part of valid UTF-8 (a lone 0xff, an overlong form, an encoded surrogate) is a
    lone surrogate here, which UTF-8 cannot encode.
    """
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "malformed"
    return "utf-8"


def canonical(addr: str) -> str:
    """A recipient as a counter key: lower case, plus-address tag removed.

    'Alice+news@Example.COM' and 'alice@example.com' are one recipient.
    """
    addr = addr.rstrip(
        "@"
    )  # degenerate "x@@" and "x@" are "x": canonical(canonical(a)) == canonical(a)
    local, at, domain = addr.rpartition("@")
    if not at:
        local, domain = addr, ""
    local = local.split("+", 1)[0] if not local.startswith("+") else local
    domain = domain.lower().rstrip(".")
    return f"{local.lower()}@{domain}" if domain else local.lower()


def mailbox(address: str) -> str:
    """The mailbox a (lower-cased) address reaches, without its +tag (the usual Postfix
    recipient_delimiter): what per-address limits count, so that bob+1@, bob+2@ ...
    cannot bomb bob with confirmation requests."""
    local, _, domain = address.rpartition("@")
    return f"{local.split('+', 1)[0]}@{domain}"
