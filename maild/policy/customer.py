"""Which customer is sending: trusted-upstream login, then client network, then sender domain.

Only a login or a network *authorises* (relaying, a customer's allowances); a sender
domain only attributes mail to a customer for accounting, because anyone can write any
MAIL FROM. The lookups go to the index in force for the config (config.directory): built
once per loaded config and replaced whole when [customer_source] changes, so each
message reads the current one, never a copy taken at start.
"""

from __future__ import annotations

from maild.address import Address
from maild.config import Config
from maild.customers.directory import initial_index
from maild.customers.index import CustomerIndex
from maild.policy.context import Client, Identity

__all__ = ["CustomerIndex", "index", "resolve"]


def index(config: Config) -> CustomerIndex:
    idx: CustomerIndex = config.directory.current(initial_index)
    return idx


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
