"""The [web] listener with a cap on open connections, in all and per client address.

aiohttp bounds a request's size and (with guard.CLIENT_SECONDS) its time, but not how
many connections one client keeps open; every one is a file descriptor of the process
that also serves SMTP. A connection past `max_connections`, or past
`max_connections_per_ip` from one address, is answered 503 and closed before aiohttp
sees it. Behind a reverse proxy every connection comes from the proxy, so the per
address cap does not apply to `trusted_proxies`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

from aiohttp import web

from maild.config import Network
from maild.netaddr import is_trusted
from maild.web.guard import client_key

log = logging.getLogger("maild.web")

BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 10\r\nConnection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 41\r\n\r\n"
    b"Too many connections; try again shortly.\n"
)


class _Gate(asyncio.Protocol):
    """Decides at connect: hands the transport to aiohttp's handler, or answers 503."""

    def __init__(self, site: CappedSite):
        self.site = site

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        addr = str(peer[0]) if peer else ""
        if not self.site.admit(addr):
            transport.write(BUSY)
            transport.close()
            return
        handler = self.site.runner_server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        self.site.opened(addr, transport)

    def data_received(self, data: bytes) -> None:  # only a refused connection: ignored
        pass


class CappedSite(web.BaseSite):
    """A TCP site like aiohttp's TCPSite, with the caps of the module docstring."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int,
        *,
        max_connections: int,
        max_per_ip: int,
        trusted: tuple[Network, ...],
        clock: Any = time.monotonic,
    ):
        super().__init__(runner)
        self._host, self._port = host, port
        self.max_connections, self.max_per_ip, self.trusted = max_connections, max_per_ip, trusted
        self.clock = clock
        self.open: dict[asyncio.Transport, str] = {}  # live connections by transport
        self._logged: dict[str, float] = {}

    @property
    def name(self) -> str:
        return f"http://{self._host or '0.0.0.0'}:{self._port}"

    def runner_server(self) -> Any:
        server = self._runner.server
        assert server is not None
        return server()

    def _live(self) -> None:
        for t in [t for t in self.open if t.is_closing()]:
            del self.open[t]

    def admit(self, addr: str) -> bool:
        self._live()
        key = client_key(addr)
        if len(self.open) >= self.max_connections:
            why = f"max_connections = {self.max_connections}"
        elif not is_trusted(addr, self.trusted) and (
            sum(1 for k in self.open.values() if k == key) >= self.max_per_ip
        ):
            why = f"max_connections_per_ip = {self.max_per_ip}"
        else:
            return True
        now = self.clock()
        if now - self._logged.get(key, -1e9) >= 60:
            if len(self._logged) > 10_000:
                self._logged.clear()
            self._logged[key] = now
            log.warning("web: connection refused: 503 client=%s reason=%s", key, why)
        return False

    def opened(self, addr: str, transport: asyncio.Transport) -> None:
        self.open[transport] = client_key(addr)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Gate(self),
            self._host,
            self._port,
            reuse_address=True,
            backlog=self._backlog,
            family=socket.AF_UNSPEC,
        )
