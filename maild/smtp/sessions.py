"""Sessions in flight, counted for the session limits ([server.limits] max_sessions,
max_sessions_per_ip) and the per-client connection limit of [ratelimit]."""

from __future__ import annotations


class SessionCounter:
    """Sessions in flight, overall and per client IP (shared by all connections)."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: dict[str, int] = {}
        # Sessions per *real* client (XFORWARD ADDR where a trusted upstream sent it),
        # for per-customer connection limits.
        self.clients: dict[str, int] = {}

    def client_add(self, addr: str) -> None:
        self.clients[addr] = self.clients.get(addr, 0) + 1

    def client_remove(self, addr: str) -> None:
        n = self.clients.get(addr, 0) - 1
        if n > 0:
            self.clients[addr] = n
        else:
            self.clients.pop(addr, None)

    def add(self, ip: str | None) -> None:
        self.total += 1
        if ip:
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1

    def remove(self, ip: str | None) -> None:
        self.total -= 1
        if ip and ip in self.per_ip:
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]
