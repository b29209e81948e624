"""IMAP modified UTF-7 (RFC 3501 section 5.1.3): how Dovecot and Courier name folders on disk.

A rule says "Deleted Items" or "Papierkorb"; on disk the second is ".Papierkorb" but
"Gelöschte Elemente" is ".Gel&APY-schte Elemente". Folder selection works on decoded
names, so rules are written the way users see their folders.
"""

from __future__ import annotations

import base64


def decode(name: str) -> str:
    """Decode one mailbox name component; an invalid encoding is returned unchanged."""
    if "&" not in name:
        return name
    out: list[str] = []
    i = 0
    n = len(name)
    while i < n:
        c = name[i]
        if c != "&":
            out.append(c)
            i += 1
            continue
        end = name.find("-", i + 1)
        if end < 0:
            return name
        chunk = name[i + 1 : end]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            b64 += "=" * (-len(b64) % 4)
            try:
                raw = base64.b64decode(b64, validate=True)
                out.append(raw.decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError):
                return name
        i = end + 1
    return "".join(out)


def encode(name: str) -> str:
    """Encode one mailbox name component the way Dovecot writes it on disk."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append(
                "&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-"
            )
            pending.clear()

    for c in name:
        if 0x20 <= ord(c) <= 0x7E:
            flush()
            out.append("&-" if c == "&" else c)
        else:
            pending.append(c)
    flush()
    return "".join(out)
