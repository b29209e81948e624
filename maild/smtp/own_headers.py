"""Header lines maild adds to every relayed message, and removes when they come from outside.

"Our systems will add header lines to try and foil such forgery" (Demon AUP): maild adds
its Received line and X-Maild-Customer (who submitted, and how maild knows), so a
complaint about a forged message can be traced. A client could send its own X-Maild-*
lines to frame someone else, so every incoming one is removed first.
"""

from __future__ import annotations

import re

from maild.policy.context import Identity

OWN_PREFIX = b"x-maild-"
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:")


def strip_own_headers(content: bytes) -> bytes:
    """Remove every X-Maild-* field (with its continuation lines) from the header block."""
    end = content.find(b"\r\n\r\n")
    head_end = len(content) if end < 0 else end + 2
    if OWN_PREFIX not in content[:head_end].lower():
        return content
    out, skipping = [], False
    for line in content[:head_end].split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        m = _FIELD.match(line)
        skipping = bool(m and m.group(1).lower().startswith(OWN_PREFIX))
        if not skipping:
            out.append(line)
    return b"\r\n".join(out) + b"\r\n" + content[head_end:]


def _clean(value: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f]", " ", value)[:900]


def header_line(name: str, value: str) -> bytes:
    """One field, folded so no line passes 78 characters where it can be avoided."""
    words, lines, cur = _clean(value).split(" "), [], f"{name}:"
    for w in words:
        if len(cur) + 1 + len(w) > 78 and cur != f"{name}:":
            lines.append(cur)
            cur = "\t" + w
        else:
            cur += " " + w
    lines.append(cur)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def customer_header(identity: Identity) -> bytes:
    if identity.customer is None:
        return header_line("X-Maild-Customer", "none (not identified)")
    how = identity.by + (f" {identity.login}" if identity.by == "login" and identity.login else "")
    return header_line("X-Maild-Customer", f"{identity.name} (by {how})")
