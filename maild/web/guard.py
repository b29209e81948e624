"""What stands between the internet and the ledger: client address, CSRF, rate limits.

* The client address is the TCP peer, or, when the peer is a trusted reverse proxy, the
  right-most X-Forwarded-For entry that is not itself a trusted proxy (the left part of
  that header is whatever the client chose to send).
* CSRF: double submit, signed. The form page sets a random cookie (SameSite=Strict,
  HttpOnly) and puts HMAC(key, cookie, path) in a hidden field; a POST must bring both.
  Another site can neither read nor set the cookie, and a token is good for one path.
* Rate limits: sliding windows in memory, per client address and per subscriber
  address, bounded in size.
* Slow clients: a request's headers and its body must each arrive within
  CLIENT_SECONDS (aiohttp would wait an hour), so that a slowloris cannot hold the
  file descriptors the SMTP side of the same process needs.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy

from maild.config import Network
from maild.netaddr import is_trusted, peer_address

CSRF_COOKIE = "maild_csrf"
_MAX_KEYS = 100_000
CLIENT_SECONDS = 20.0  # for the headers (and an idle keep-alive), and again for the body


def client_address(peer: str, forwarded_for: Iterable[str], trusted: tuple[Network, ...]) -> str:
    """The address a request came from, believing X-Forwarded-For only from `trusted`
    (the test SMTP uses, maild.netaddr: an IPv4-mapped peer is its IPv4 address)."""
    if not is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for v in forwarded_for for h in v.split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a garbled header: the proxy itself is all we know
        if not is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def client_of(request: web.Request, settings: Any) -> str:
    """The client of an aiohttp request under the [web] settings' trusted proxies."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    addr = peer_address(peer)[0] if peer else (request.remote or "")
    return client_address(
        addr, request.headers.getall("X-Forwarded-For", []), settings.trusted_proxies
    )


def client_key(addr: str) -> str:
    """What counts as one client: an IPv4 address, an IPv6 client by its /64 (one
    host's usual share: a /128 per connection would make the cap worthless)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return addr


async def read_form(request: web.Request) -> MultiDictProxy[Any]:
    """The POSTed fields, if the client sends them within CLIENT_SECONDS; else a 408."""
    try:
        async with asyncio.timeout(CLIENT_SECONDS):
            return await request.post()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="The request body did not arrive in time.") from None


def new_nonce() -> str:
    return secrets.token_urlsafe(24)


def csrf_token(key: bytes, nonce: str, path: str) -> str:
    return hmac.new(key, f"csrf\0{nonce}\0{path}".encode(), hashlib.sha256).hexdigest()


def csrf_ok(key: bytes, nonce: str | None, path: str, given: str | None) -> bool:
    if not nonce or not given:
        return False
    return hmac.compare_digest(csrf_token(key, nonce, path), given)


class Limiter:
    """At most `limit` hits per key within `window` seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.hits: dict[str, collections.deque[float]] = {}

    def allow(self, key: str, limit: int, window: float) -> bool:
        now = self.clock()
        q = self.hits.get(key)
        if q is None:
            if len(self.hits) >= _MAX_KEYS:
                self._prune(now, window)
            q = self.hits[key] = collections.deque()
        while q and q[0] <= now - window:
            q.popleft()
        if len(q) >= limit:
            return False
        q.append(now)
        return True

    def _prune(self, now: float, window: float) -> None:
        for k in [k for k, q in self.hits.items() if not q or q[-1] <= now - window]:
            del self.hits[k]
        while len(self.hits) >= _MAX_KEYS:  # all busy: forget the oldest
            del self.hits[next(iter(self.hits))]
