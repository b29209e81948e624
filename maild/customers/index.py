"""The customer index: lookups whose cost does not grow with the number of customers.

Networks are matched longest prefix first through one hash table per prefix length in
use (at most 33 probes for IPv4, 129 for IPv6, in practice the few lengths a provider
uses); names, logins, domains and addresses are hash maps. An index is immutable once
built: a refresh builds a new one and publishes it whole (config.CustomerDirectory).

Conflicts: a record (name, network, login) already claimed stays with the customer that
claimed it first, in this order: policies.toml's [[customers]] in file order, then the
source's customers already in force, then the source's newcomers by name. Inside
policies.toml the later claim is dropped and the rest of that customer kept (maild has
always let the first claim win there); a source customer that collides is refused whole
and the version of it in force before (if any) stays. Every refusal is one log line
naming both customers. A domain or address listed twice is attributed to the first
customer; both may still use it as a sender (identity.owner_of reads each customer's own
domains).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from maild.address import Address
    from maild.config import Customer

T = TypeVar("T")
IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class NetworkMap(Generic[T]):
    """Longest-prefix match over IPv4 and IPv6 networks; most specific wins."""

    def __init__(self) -> None:
        # version -> prefix length -> network address >> (bits - length) -> value
        self._tables: dict[int, dict[int, dict[int, T]]] = {4: {}, 6: {}}
        self._lengths: dict[int, tuple[tuple[int, int, dict[int, T]], ...]] = {4: (), 6: ()}

    def add(self, net: Net, value: T) -> T | None:
        """Claim net for value; the value that already holds exactly net, if any (kept)."""
        held = self.holder(net)
        if held is not None:
            return held
        table = self._tables[net.version].setdefault(net.prefixlen, {})
        table[int(net.network_address) >> (net.max_prefixlen - net.prefixlen)] = value
        return None

    def holder(self, net: Net) -> T | None:
        """The value holding exactly net (not a wider network that contains it)."""
        table = self._tables[net.version].get(net.prefixlen, {})
        return table.get(int(net.network_address) >> (net.max_prefixlen - net.prefixlen))

    def freeze(self) -> NetworkMap[T]:
        """Fix the lengths to probe, longest first; call once, after the last add."""
        for version, tables in self._tables.items():
            bits = 32 if version == 4 else 128
            self._lengths[version] = tuple(
                (bits - plen, plen, tables[plen]) for plen in sorted(tables, reverse=True)
            )
        return self

    def get(self, ip: IP) -> T | None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        n = int(ip)
        for shift, _plen, table in self._lengths[ip.version]:
            v = table.get(n >> shift)
            if v is not None:
                return v
        return None

    def __len__(self) -> int:
        return sum(len(t) for tables in self._tables.values() for t in tables.values())


@dataclass(frozen=True)
class CustomerIndex:
    customers: tuple[Customer, ...]
    names: dict[str, Customer]
    networks: NetworkMap[Customer]
    logins: dict[str, Customer]
    domains: dict[str, Customer]
    addresses: dict[str, Customer]
    # The source's problems, then one line per claim refused while building.
    refused: tuple[str, ...] = ()
    built: float = field(default_factory=time.time)
    # What the source reported with its customers (doctor, report, the CLI).
    source_note: str = ""

    def by_name(self, name: str) -> Customer | None:
        return self.names.get(name)

    def by_login(self, login: str) -> Customer | None:
        return self.logins.get(login.casefold()) if login else None

    def by_ip(self, ip: IP | None) -> Customer | None:
        return None if ip is None else self.networks.get(ip)

    def by_sender(self, sender: Address | None) -> Customer | None:
        if sender is None or sender.is_null:
            return None
        return self.addresses.get(sender.addr.lower()) or self.domains.get(sender.domain)

    def counts(self) -> dict[str, int]:
        """Customers in force by where they came from: policies.toml, files, postgresql."""
        out: dict[str, int] = {}
        for c in self.customers:
            kind = origin_kind(c.origin)
            out[kind] = out.get(kind, 0) + 1
        return out

    @classmethod
    def build(
        cls,
        local: Iterable[Customer],
        source: Sequence[Customer] = (),
        previous: CustomerIndex | None = None,
        source_note: str = "",
        problems: Sequence[str] = (),
    ) -> CustomerIndex:
        """problems: the source's, kept first in `refused` (the CLI and doctor show them)."""
        b = _Builder()
        b.refused.extend(problems)
        for c in local:
            b.add_local(c)
        in_force = previous.names if previous is not None else {}
        rank = {c.name: i for i, c in enumerate(previous.customers)} if previous else {}
        # Established customers claim first, so a newcomer cannot take their records.
        ordered = sorted(source, key=lambda c: (rank.get(c.name, len(rank)), c.name))
        for c in ordered:
            if b.add_source(c):
                continue
            old = in_force.get(c.name)
            if old is not None and old is not c and old.origin == c.origin and b.add_source(old):
                b.refused.append(f"customers: {c.name}: keeping the version in force")
        b.networks.freeze()
        return cls(
            customers=tuple(b.customers),
            names=b.names,
            networks=b.networks,
            logins=b.logins,
            domains=b.domains,
            addresses=b.addresses,
            refused=tuple(b.refused),
            source_note=source_note,
        )


def origin_kind(origin: str) -> str:
    """ "files", "postgresql" or "policies.toml", from a Customer.origin ("files:PATH", ...)."""
    kind, sep, _ = origin.partition(":")
    if sep and kind == "files":
        return kind
    return "postgresql" if sep and kind.startswith("postgresql") else "policies.toml"


class _Builder:
    def __init__(self) -> None:
        self.customers: list[Customer] = []
        self.names: dict[str, Customer] = {}
        self.networks: NetworkMap[Customer] = NetworkMap()
        self.logins: dict[str, Customer] = {}
        self.domains: dict[str, Customer] = {}
        self.addresses: dict[str, Customer] = {}
        self.refused: list[str] = []

    def _attribute(self, c: Customer) -> None:
        for d in c.domains:
            self.domains.setdefault(d, c)
        for a in c.addresses:
            self.addresses.setdefault(a.lower(), c)

    def add_local(self, c: Customer) -> None:
        """A policies.toml customer: its records already claimed are dropped, one line each."""
        self.customers.append(c)
        self.names[c.name] = c
        for n in c.networks:
            held = self.networks.add(n, c)
            if held is not None:
                self.refused.append(_line(c, f"network {n}", held, "dropped from"))
        for login in c.logins:
            held = self.logins.setdefault(login.casefold(), c)
            if held is not c:
                self.refused.append(_line(c, f"login {login}", held, "dropped from"))
        self._attribute(c)

    def add_source(self, c: Customer) -> bool:
        """A source customer, whole or not at all."""
        why = self._collision(c)
        if why:
            self.refused.append(why)
            return False
        self.customers.append(c)
        self.names[c.name] = c
        for n in c.networks:
            self.networks.add(n, c)
        for login in c.logins:
            self.logins[login.casefold()] = c
        self._attribute(c)
        return True

    def _collision(self, c: Customer) -> str:
        held = self.names.get(c.name)
        if held is not None:
            return _line(c, "the name", held, "refused")
        seen: set[Net] = set()
        for n in c.networks:
            if n in seen:
                continue
            seen.add(n)
            held = self.networks.holder(n)
            if held is not None:
                return _line(c, f"network {n}", held, "refused")
        for login in c.logins:
            held = self.logins.get(login.casefold())
            if held is not None:
                return _line(c, f"login {login}", held, "refused")
        return ""


def _line(c: Customer, what: str, held: Customer, verb: str) -> str:
    where = f" ({c.origin})" if c.origin else ""
    held_where = f" ({held.origin})" if held.origin else ""
    return (
        f"customers: {c.name}{where}: {verb}: {what} belongs to customer "
        f"{held.name}{held_where}; remove it from one of them"
    )
