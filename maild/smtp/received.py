"""The Received: line maild adds, and the SASL login Postfix reports in its own.

RFC 5321 4.4: every relay prepends a Received line. maild's names the real client (from
XFORWARD when a trusted upstream sent it), so the trace shows who really submitted the
message, and its id is maild's session id, which is also in maild's log lines.
"""

from __future__ import annotations

import datetime
import email.message
import re
import time
from email.utils import format_datetime

from maild.address import Address
from maild.policy.context import Client

_AUTH = re.compile(r"\(Authenticated sender:\s*([^)\s]+)\s*\)", re.I)
_SAFE = re.compile(r"[^\x21-\x7e]")
_SAFE_TEXT = re.compile(r"[^\x20-\x7e]")


_last_date: tuple[int, str] = (-1, "")


def date_now(t: float | None = None) -> str:
    """email.utils.format_datetime(localtime()), the Received line's date (of time t):
    made once a second (it has no finer resolution), not for every message (8 us)."""
    global _last_date
    if t is None:
        t = time.time()
    second = int(t)
    if _last_date[0] != second:
        _last_date = (second, format_datetime(datetime.datetime.fromtimestamp(t).astimezone()))
    return _last_date[1]


def _tok(value: str, default: str) -> str:
    """A header-safe token: printable ASCII without spaces or parentheses."""
    v = _SAFE.sub("", value or "").replace("(", "").replace(")", "")[:255]
    return v or default


def received_header(
    client: Client,
    hostname: str,
    session_id: str,
    recipients: list[Address],
    date: str,
    *,
    tls: str = "",
    authenticated: bool = False,
) -> bytes:
    """RFC 5321 4.4's trace line; over TLS with Postfix's "(using ...)" comment and
    RFC 3848's ESMTPS/ESMTPSA."""
    helo = _tok(client.helo, "unknown")
    name = _tok(client.name, "unknown")
    addr = _tok(client.addr, "UNAVAILABLE")
    if ":" in addr and not addr.upper().startswith("IPV6:"):
        addr = "IPv6:" + addr
    proto = _tok(client.proto, "SMTP")
    if proto == "ESMTP" and (tls or authenticated):
        proto = "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")
    using = f"\r\n\t(using {_SAFE_TEXT.sub('', tls)})" if tls else ""
    for_clause = ""
    if len(recipients) == 1 and recipients[0].addr:
        for_clause = f"\r\n\tfor <{_tok(recipients[0].addr, '')}>"
    return (
        f"Received: from {helo} ({name} [{addr}]){using}\r\n"
        f"\tby {hostname} (maild) with {proto} id {session_id}{for_clause};\r\n"
        f"\t{date}\r\n"
    ).encode("ascii")


def authenticated_login(headers: email.message.Message) -> str:
    """The SASL login from the topmost Received header (Postfix's, with
    smtpd_sasl_authenticated_header = yes). Only called for trusted upstreams."""
    received = headers.get_all("Received") or []
    if not received:
        return ""
    m = _AUTH.search(str(received[0]))
    return m.group(1) if m else ""
