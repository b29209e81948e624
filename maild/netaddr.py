"""Who is at the other end of a connection: its address, and whether it is trusted.

One test of "is this address in those networks" for every layer (SMTP admission, the
PROXY protocol, the web listener), an IPv4-mapped IPv6 address as its IPv4 form.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@functools.lru_cache(maxsize=4096)
def parse_ip(addr: str) -> IP | None:
    """The address of a textual IP address, None for anything else. Cached: a session
    asks for its client's address at connect, at admission and in the rules (2 us each)."""
    try:
        return ipaddress.ip_address(addr)
    except ValueError:
        return None


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
    if not trusted:
        return False
    ip = parse_ip(addr)
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in trusted)
