"""Which customer is sending: trusted-upstream login, then client network, then sender domain.

Only a login or a network *authorises* (relaying, a customer's allowances); a sender
domain only attributes mail to a customer for accounting, because anyone can write any
MAIL FROM. The lookup index is built once per loaded config, not per message.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from maild.address import Address
from maild.config import Config, Customer
from maild.policy.context import Client, Identity


@dataclass(frozen=True)
class CustomerIndex:
    logins: dict[str, Customer]
    networks: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Customer], ...]
    domains: dict[str, Customer]
    addresses: dict[str, Customer]

    @classmethod
    def build(cls, config: Config) -> CustomerIndex:
        logins: dict[str, Customer] = {}
        nets: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Customer]] = []
        domains: dict[str, Customer] = {}
        addresses: dict[str, Customer] = {}
        for c in config.customers:
            for login in c.logins:
                logins.setdefault(login.casefold(), c)
            nets.extend((n, c) for n in c.networks)
            for d in c.domains:
                domains.setdefault(d, c)
            for a in c.addresses:
                addresses.setdefault(a.lower(), c)
        # Most specific network first, so a /32 inside a customer's /24 wins.
        nets.sort(key=lambda nc: -nc[0].prefixlen)
        return cls(logins, tuple(nets), domains, addresses)

    def by_login(self, login: str) -> Customer | None:
        return self.logins.get(login.casefold()) if login else None

    def by_ip(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> Customer | None:
        if ip is None:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        for net, c in self.networks:
            if ip.version == net.version and ip in net:
                return c
        return None

    def by_sender(self, sender: Address | None) -> Customer | None:
        if sender is None or sender.is_null:
            return None
        return self.addresses.get(sender.addr.lower()) or self.domains.get(sender.domain)


_cache: tuple[Config, CustomerIndex] | None = None


def index(config: Config) -> CustomerIndex:
    global _cache
    if _cache is None or _cache[0] is not config:
        _cache = (config, CustomerIndex.build(config))
    return _cache[1]


def resolve(
    config: Config, client: Client, login: str = "", sender: Address | None = None
) -> Identity:
    idx = index(config)
    if login and (c := idx.by_login(login)):
        return Identity(c, "login", login)
    if c := idx.by_ip(client.ip):
        return Identity(c, "network", login)
    if c := idx.by_sender(sender):
        return Identity(c, "domain", login)
    return Identity(None, "-", login)
