"""Who is at the other end of a connection: its address, and whether it is trusted.

One test of "is this address in those networks" for every layer (SMTP admission, the
PROXY protocol, the web listener), an IPv4-mapped IPv6 address as its IPv4 form.
"""

from __future__ import annotations

import ipaddress
from typing import Any

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def peer_address(peer: Any) -> tuple[str, str]:
    """(address, port) of a peername, an IPv4-mapped IPv6 address as its IPv4 form."""
    if not isinstance(peer, tuple):
        return "", "0"
    addr = str(peer[0])
    if addr.startswith("::ffff:"):
        addr = addr[7:]
    return addr, str(peer[1])


def is_trusted(addr: str, trusted: Networks) -> bool:
    """Whether addr (a textual address) is in one of the networks."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in trusted)
