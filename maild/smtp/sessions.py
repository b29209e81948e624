"""Sessions in flight, counted for `maild status`, the shutdown grace and the per-client
connection limit of [ratelimit]. The session limits themselves ([server.limits]
max_sessions, max_sessions_per_ip, ...) are admission control's: maild.smtp.admission."""

from __future__ import annotations


class SessionCounter:
    """Sessions in flight, overall and per real client (shared by all connections)."""

    def __init__(self) -> None:
        self.total = 0
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

    def add(self) -> None:
        self.total += 1

    def remove(self) -> None:
        self.total -= 1
