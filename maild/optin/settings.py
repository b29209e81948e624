"""The [optin] section of policies.toml: registered lists and the enforcement thresholds.

Lists may also be registered in the state store with `maild optin list register`; both
kinds are merged by maild.optin.registry. A list's consent text is what subscribers are
told when they confirm; its SHA-256 is recorded with every consent event, so the text a
subscriber agreed to can be shown even after the list owner changed it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from maild.config import Reader, is_hostname

# RFC 2919 list-id: list-label "." list-id-namespace, both dot-atom-text.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
LIST_ID = re.compile(rf"^{_ATEXT}(\.{_ATEXT})+$")
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")


def consent_hash(text: str) -> str:
    """What a subscriber was told, as recorded with each event (normalised line ends)."""
    return hashlib.sha256(text.replace("\r\n", "\n").strip().encode("utf-8")).hexdigest()


def normalise_list_id(value: str) -> str:
    """'News <news.acme.example>' or 'news.acme.example' -> 'news.acme.example'."""
    v = value.strip()
    if "<" in v and v.endswith(">"):
        v = v[v.rindex("<") + 1 : -1]
    return v.strip().lower()


def valid_pattern(p: str) -> bool:
    """An address, or an address pattern with '*' in the local part (VERP) only."""
    local, at, domain = p.rpartition("@")
    return bool(at and local and is_hostname(domain) and " " not in p and "@" not in local)


@dataclass(frozen=True)
class ListConfig:
    id: str
    customer: str
    owner: str
    consent_text: str
    domain: str = ""
    name: str = ""
    return_paths: tuple[str, ...] = ()
    unsubscribe: tuple[str, ...] = ()

    @property
    def consent_hash(self) -> str:
        return consent_hash(self.consent_text)


@dataclass(frozen=True)
class OptinConfig:
    enabled: bool = True
    lists: tuple[ListConfig, ...] = ()
    token_lifetime: float = 3 * 86400.0
    max_requests: int = 3  # confirmation mails per address and list per 24 h
    confirm_local_part: str = "confirm"
    attested_consent: bool = True  # owner-add / import with an attestation count as consent
    notify_revocation: bool = True
    require_one_click: bool = False  # refuse list mail without an RFC 8058 https URI
    complaint_warning_percent: float = 0.1
    complaint_limit_percent: float = 0.3
    complaint_window: float = 86400.0
    complaint_min_volume: int = 1000
    complaint_addresses: tuple[str, ...] = ("abuse@*",)


def parse_list(r: Reader, seen: set[str]) -> ListConfig | None:
    raw_id = r.str("id", required=True)
    list_id = normalise_list_id(raw_id)
    if raw_id and not LIST_ID.match(list_id):
        r.error("id", raw_id, 'an RFC 2919 List-Id such as "news.customer.example"')
    elif list_id in seen:
        r.error("id", raw_id, "an id no other list has")
    seen.add(list_id)
    customer = r.str("customer", required=True)
    owner = r.str("owner", required=True).strip().lower()
    if owner and (not valid_pattern(owner) or "*" in owner):
        r.error("owner", owner, 'the address of the list owner, e.g. "news-owner@customer.example"')
    domain = r.str("domain", "").strip().lower().rstrip(".")
    if not domain and "@" in owner:
        domain = owner.rpartition("@")[2]
    if domain and not is_hostname(domain):
        r.error("domain", domain, "a domain name where maild receives confirm+TOKEN@ replies")
    patterns = {}
    for key in ("return_paths", "unsubscribe"):
        vals = r.str_list(key, lower=True)
        for i, p in enumerate(vals):
            if not valid_pattern(p):
                r.error(
                    f"{key}[{i}]",
                    p,
                    "an address, or a pattern with * in the local part "
                    'such as "news-bounces+*@lists.customer.example"',
                )
        patterns[key] = vals
    text = r.str("consent_text", "")
    path = r.str("consent_text_file", "")
    if text and path:
        r.error("consent_text_file", path, "either consent_text or consent_text_file, not both")
    elif path:
        text_file = Path(path)
        if not text_file.is_absolute():
            r.error("consent_text_file", path, "an absolute path")
        else:
            try:
                text = text_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                r.error("consent_text_file", path, f"a readable UTF-8 file ({e})")
    if not text.strip() and not path:
        r.problems.append(
            f"{r.prefix}: consent_text (or consent_text_file) is missing: it is "
            "what subscribers are told they agree to, recorded with each event"
        )
    name = r.str("name", "")
    r.unknown()
    if not (list_id and customer and owner):
        return None
    return ListConfig(
        id=list_id,
        customer=customer,
        owner=owner,
        consent_text=text.strip(),
        domain=domain,
        name=name or list_id,
        return_paths=patterns["return_paths"],
        unsubscribe=patterns["unsubscribe"],
    )


def parse_optin(r: Reader) -> OptinConfig:
    d = OptinConfig()
    seen: set[str] = set()
    lists = tuple(x for x in (parse_list(lr, seen) for lr in r.tables("lists")) if x)
    local = r.str("confirm_local_part", d.confirm_local_part).lower()
    if not _LOCAL.match(local) or "+" in local:
        r.error("confirm_local_part", local, 'a plain local part such as "confirm"')
    cfg = OptinConfig(
        enabled=r.bool("enabled", d.enabled),
        lists=lists,
        token_lifetime=r.duration("token_lifetime", "3d", positive=True),
        max_requests=r.int("max_requests", d.max_requests, minimum=1),
        confirm_local_part=local,
        attested_consent=r.bool("attested_consent", d.attested_consent),
        notify_revocation=r.bool("notify_revocation", d.notify_revocation),
        require_one_click=r.bool("require_one_click", d.require_one_click),
        complaint_warning_percent=r.float("complaint_warning_percent", d.complaint_warning_percent),
        complaint_limit_percent=r.float("complaint_limit_percent", d.complaint_limit_percent),
        complaint_window=r.duration("complaint_window", "24h"),
        complaint_min_volume=r.int("complaint_min_volume", d.complaint_min_volume, minimum=1),
        complaint_addresses=r.str_list("complaint_addresses", d.complaint_addresses, lower=True),
    )
    for i, p in enumerate(cfg.complaint_addresses):
        if "@" not in p:
            r.error(f"complaint_addresses[{i}]", p, 'an address pattern such as "abuse@*"')
    if cfg.token_lifetime < 600:
        r.error("token_lifetime", cfg.token_lifetime, 'at least 10 minutes (e.g. "3d")')
    if cfg.complaint_warning_percent > cfg.complaint_limit_percent:
        r.error(
            "complaint_warning_percent",
            cfg.complaint_warning_percent,
            "at most complaint_limit_percent",
        )
    r.unknown()
    return cfg


def section(config: object) -> OptinConfig:
    return getattr(config, "sections", {}).get("optin") or OptinConfig()
