"""The PROXY protocol (HAProxy's v1 text and v2 binary header), from trusted proxies only.

A load balancer in front of maild makes every client look like the balancer; the header
it sends first names the real client, which admission, policy and the logs then use.
Only peers in [server] trusted_proxies may send one, and they must (Postfix's
smtpd_upstream_proxy_protocol): a connection from a trusted proxy without a valid header
within PROXY_TIMEOUT is closed without a reply, and from anyone else "PROXY ..." is just
an unknown command. aiosmtpd's parser reads the header; maild decides whom to believe.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from aiosmtpd.proxy_protocol import get_proxy

log = logging.getLogger("maild.smtp")

PROXY_TIMEOUT = 5.0  # Postfix's smtpd_upstream_proxy_timeout


async def read_header(reader: Any, session_id: str, peer: str) -> tuple[str, int] | None:
    """(client address, port) from the header, or None (logged) if there is none.

    A header that names no client (v1 UNKNOWN, v2 LOCAL: the balancer's own health
    check) keeps the balancer as the client."""
    try:
        data = await asyncio.wait_for(get_proxy(reader), PROXY_TIMEOUT)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        data = None
    if data is None or not data.valid:
        why = "timeout or connection closed" if data is None else data.error or "malformed"
        log.warning(
            "%s: warning: PROXY protocol header refused from proxy %s: %s", session_id, peer, why
        )
        return None
    if data.src_addr is None or not isinstance(
        data.src_addr, ipaddress.IPv4Address | ipaddress.IPv6Address
    ):
        return peer, 0
    return str(data.src_addr), int(data.src_port or 0)
