"""XFORWARD (Postfix's XFORWARD_README): who the real client is, both ways.

From a trusted upstream (Postfix in before-queue mode) maild takes XFORWARD, which
defines the client that policy sees; to the downstream maild sends XFORWARD before
every transaction (Postfix resets it after each one), so Postfix logs the real client.
Values are RFC 3461 xtext; "[UNAVAILABLE]" means unknown.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Protocol

from maild.policy.context import Client

ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
UNAVAILABLE = "[UNAVAILABLE]"
MAX_LINE = 500  # a command under 512 octets with its CRLF


class Counter(Protocol):
    def client_add(self, addr: str) -> None: ...

    def client_remove(self, addr: str) -> None: ...


_XCHARS = re.compile(r"[!-*,-<>-~]*")  # '!'..'~' but '+' and '=': xtext as they are


def xtext(value: str) -> str:
    """RFC 3461 xtext: '+', '=' and characters outside '!'..'~' as +HH."""
    if _XCHARS.fullmatch(value):  # a host name, an address, a port: nothing to encode
        return value
    return _xtext_chars(value)


def _xtext_chars(value: str) -> str:
    return "".join(
        c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}"
        for c in value.encode("utf-8", "surrogateescape").decode("latin-1")
    )


def xtext_decode(value: str) -> str | None:
    """RFC 3461 xtext, as Postfix sends XFORWARD values; None if malformed."""
    out, i = [], 0
    while i < len(value):
        ch = value[i]
        if ch == "+":
            h = value[i + 1 : i + 3]
            if len(h) != 2 or any(c not in "0123456789ABCDEFabcdef" for c in h):
                return None
            out.append(chr(int(h, 16)))
            i += 3
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse(arg: str) -> dict[str, str] | str:
    """The attributes of an XFORWARD command's argument, or the 501 reply to send."""
    update: dict[str, str] = {}
    for item in arg.split():
        name, eq, value = item.partition("=")
        name = name.upper()
        if not eq or name not in ATTRS:
            return f"501 5.5.4 Bad XFORWARD attribute name: {name[:32]}"
        decoded = xtext_decode(value)
        if decoded is None or len(decoded) > 255:
            return f"501 5.5.4 Bad XFORWARD attribute value for {name}"
        update[name] = decoded
    return update


def apply(xf: Mapping[str, str], c: Client, sessions: Counter | None, counted: bool) -> None:
    """Set the client from the session's XFORWARD attributes; a new ADDR moves the
    session from the old address's count to the new one's (when it was counted)."""

    def val(k: str) -> str | None:
        v = xf.get(k)
        return None if v is None or v == UNAVAILABLE else v

    if (addr := val("ADDR")) is not None:
        addr = addr[5:] if addr.upper().startswith("IPV6:") else addr
        if sessions is not None and addr != c.addr and counted:
            sessions.client_remove(c.addr)
            sessions.client_add(addr)
        c.addr = addr
    if (name := val("NAME")) is not None:
        c.name = name
    for attr, key in (
        ("port", "PORT"),
        ("proto", "PROTO"),
        ("helo", "HELO"),
        ("ident", "IDENT"),
        ("source", "SOURCE"),
    ):
        if key in xf:
            # [UNAVAILABLE] means unknown: never keep the upstream's own value.
            setattr(c, attr, val(key) or "")


def downstream_lines(c: Client, accepted: frozenset[str]) -> list[str]:
    """XFORWARD commands (each under 512 octets) for the attributes the downstream
    accepts (`accepted`, from its EHLO)."""
    if not accepted:
        return []
    values = {
        "NAME": c.name if c.name and c.name != "unknown" else UNAVAILABLE,
        "ADDR": (f"IPV6:{c.addr}" if ":" in c.addr else c.addr) or UNAVAILABLE,
        "PORT": c.port or UNAVAILABLE,
        "PROTO": c.proto or "SMTP",
        "HELO": c.helo or UNAVAILABLE,
        "IDENT": c.ident or UNAVAILABLE,
        "SOURCE": c.source or ("REMOTE" if not c.trusted_peer else UNAVAILABLE),
    }
    lines, cur = [], "XFORWARD"
    for k, v in values.items():
        if k not in accepted:
            continue
        item = f" {k}={xtext(v[:255])}"
        if len(cur) + len(item) > MAX_LINE:
            lines.append(cur)
            cur = "XFORWARD"
        cur += item
    if cur != "XFORWARD":
        lines.append(cur)
    return lines
