"""Registered lists, from policies.toml and from the store, indexed for the hot path.

A list is found by its return path (envelope sender, VERP patterns allowed: '*' stands
for any text without '@'), by its List-Id, by the address its unsubscribe requests go
to, and by its domain (where confirm+TOKEN@ replies arrive). A list registered in both
places is taken from policies.toml: the file is what the operator reviews.

A list's return paths, unsubscribe addresses and confirm+TOKEN@ addresses are its
customer's own for the ownership checks (maild.policy.identity.owner_of): registering a
list is the operator's record that they are, as a customer's `addresses` are.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from maild.optin.settings import ListConfig, OptinConfig


def compile_pattern(p: str) -> re.Pattern[str]:
    """'news-bounces+*@lists.example' -> a case-insensitive full match, '*' captured."""
    parts = [re.escape(x) for x in p.lower().split("*")]
    return re.compile("([^@]*)".join(parts), re.I)


def verp_decode(captured: str) -> str | None:
    """The recipient encoded in a VERP local part ('bob=example.org' -> bob@example.org)."""
    local, eq, domain = captured.rpartition("=")
    if eq and local and "." in domain:
        return f"{local}@{domain}".lower()
    return None


@dataclass(frozen=True)
class MailingList:
    cfg: ListConfig
    source: str  # "config" or "store"
    return_paths: tuple[re.Pattern[str], ...] = ()
    unsubscribe: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def of(cls, cfg: ListConfig, source: str) -> MailingList:
        return cls(
            cfg,
            source,
            tuple(compile_pattern(p) for p in cfg.return_paths),
            tuple(compile_pattern(p) for p in cfg.unsubscribe),
        )

    @property
    def id(self) -> str:
        return self.cfg.id

    @property
    def customer(self) -> str:
        return self.cfg.customer

    def return_path_match(self, addr: str) -> re.Match[str] | None:
        a = addr.lower()
        return next((m for p in self.return_paths if (m := p.fullmatch(a))), None)

    def is_unsubscribe(self, addr: str) -> re.Match[str] | None:
        a = addr.lower()
        return next((m for p in self.unsubscribe if (m := p.fullmatch(a))), None)


@dataclass
class Registry:
    lists: dict[str, MailingList] = field(default_factory=dict)
    by_customer: dict[str, list[MailingList]] = field(default_factory=dict)
    domains: set[str] = field(default_factory=set)  # where confirm+TOKEN@ replies arrive
    mail_domains: set[str] = field(default_factory=set)  # + return path, unsubscribe domains
    shadowed: list[str] = field(default_factory=list)  # store lists hidden by the config

    @classmethod
    def build(cls, settings: OptinConfig, stored: list[ListConfig]) -> Registry:
        reg = cls()
        for c in settings.lists:
            reg.lists[c.id] = MailingList.of(c, "config")
        for c in stored:
            if c.id in reg.lists:
                reg.shadowed.append(c.id)
                continue
            reg.lists[c.id] = MailingList.of(c, "store")
        for lst in reg.lists.values():
            reg.by_customer.setdefault(lst.customer, []).append(lst)
            if lst.cfg.domain:
                reg.domains.add(lst.cfg.domain)
            reg.mail_domains.update(
                p.rpartition("@")[2] for p in lst.cfg.return_paths + lst.cfg.unsubscribe
            )
        reg.mail_domains |= reg.domains
        return reg

    def get(self, list_id: str) -> MailingList | None:
        return self.lists.get(list_id.lower())

    def for_return_path(self, customer: str, sender: str) -> MailingList | None:
        """The customer's list whose return path the envelope sender matches."""
        if not sender:
            return None
        return next(
            (lst for lst in self.by_customer.get(customer, ()) if lst.return_path_match(sender)),
            None,
        )

    def any_return_path(self, addr: str) -> tuple[MailingList, re.Match[str]] | None:
        """Any list whose return path this (recipient) address is: bounces, complaints."""
        if addr.rpartition("@")[2].lower() not in self.mail_domains:
            return None
        for lst in self.lists.values():
            m = lst.return_path_match(addr)
            if m:
                return lst, m
        return None

    def for_unsubscribe(self, addr: str) -> tuple[MailingList, re.Match[str]] | None:
        if addr.rpartition("@")[2].lower() not in self.mail_domains:
            return None
        for lst in self.lists.values():
            m = lst.is_unsubscribe(addr)
            if m:
                return lst, m
        return None

    def address_of(
        self, customer: str, addr: str, confirm_local: str, token_list: Callable[[str], str | None]
    ) -> str | None:
        """Which of the customer's lists `addr` is an address of (as a reason), or None.

        Only that customer's lists are searched, so a list domain several customers share
        lends none of them another's addresses; a confirm+TOKEN@ address belongs to the
        list whose token it carries (`token_list(token)` -> list id or None)."""
        local, _, domain = addr.lower().rpartition("@")
        if domain not in self.mail_domains:
            return None
        for lst in self.by_customer.get(customer, ()):
            if lst.return_path_match(addr):
                return f"return path of list {lst.id}"
            if lst.is_unsubscribe(addr):
                return f"unsubscribe address of list {lst.id}"
        token = self.confirm_token(local, domain, confirm_local)
        confirmed = self.get(token_list(token) or "") if token else None
        if (
            confirmed is not None
            and confirmed.customer == customer
            and confirmed.cfg.domain == domain
        ):
            return f"confirmation address of list {confirmed.id}"
        return None

    def confirm_token(self, local: str, domain: str, confirm_local: str) -> str | None:
        """The token of a confirm+TOKEN@<list domain> address, else None."""
        if domain.lower() not in self.domains:
            return None
        head, plus, token = local.partition("+")
        if not plus or head.lower() != confirm_local:
            return None
        return token.lower()
