"""The address fields of a message's header (From, Sender, Reply-To), parsed once.

Context.Message parses them on first use and every forged-header check reads the result.
"""

from __future__ import annotations

import contextlib
import email.errors
import email.message
import email.policy
import re

ADDRESS_FIELDS = ("from", "sender", "reply-to")
# `Display Name <local@domain>` or `local@domain` in plain ASCII atoms: most From: lines,
# parsed without the (slow) full RFC 5322 parser.
_ATOM_CHARS = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL = rf"{_ATOM_CHARS}(?:\.{_ATOM_CHARS})*"
_HOST = (
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.?"
)
_PLAIN_MAILBOX = re.compile(
    rf"^[ \t]*(?:([A-Za-z0-9 \t]*?)[ \t]*<({_LOCAL})@({_HOST})>|({_LOCAL})@({_HOST}))[ \t]*$"
)


MAX_ADDRESS_FIELD = 4096  # characters in one From:/Sender:/Reply-To:/... field
MAX_ENCODED_WORDS = 50  # RFC 2047 encoded words in one address field


def parse_mailboxes(
    headers: email.message.Message,
) -> dict[str, tuple[tuple[str, str, str], ...] | None]:
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
                boxes.append(
                    (
                        " ".join((m.group(1) or "").split()),
                        f"{local}@{domain}",
                        domain.lower().rstrip("."),
                    )
                )
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
