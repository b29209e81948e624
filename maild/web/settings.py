"""The [web] section of policies.toml: maild's HTTP listener, its public URL, /metrics.

Off by default: an operator turns it on, puts a TLS-terminating reverse proxy in front
of `listen` and tells maild the public `base_url` its pages are reached at (the links in
confirmation mail and the one-click unsubscribe URLs are built from it).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from maild.config import Network, Reader, is_hostname
from maild.web import keys as _keys  # noqa: F401  (registers the schema)

log = logging.getLogger("maild.web")

# What [web] needs loaded before root is dropped (maild.privs.drop): aiohttp and
# prometheus_client import parts of the standard library the unprivileged user may not
# be able to read.
PRELOAD = (
    "maild.web.app",
    "maild.web.consent",
    "maild.web.metrics",
    "maild.web.pages",
    "maild.web.oneclick",
    "maild.web.guard",
    "maild.web.listener",
    "maild.optin.model",
    "prometheus_client.exposition",
    "prometheus_client.parser",
)


@dataclass(frozen=True)
class WebConfig:
    enabled: bool = False
    listen: tuple[str, int] = ("127.0.0.1", 8025)
    base_url: str = ""  # "https://lists.example.net/maild", no trailing slash
    # X-Forwarded-For is believed only from these peers (the reverse proxy).
    trusted_proxies: tuple[Network, ...] = ()
    # List mail's https List-Unsubscribe must be maild's one-click URL for its recipient.
    require_one_click: bool = False
    metrics: bool = True  # serve /metrics at all
    metrics_listen: tuple[str, int] | None = None  # its own address (then not on `listen`)
    client_limit: int = 20  # form POSTs per client address per limit_window
    address_limit: int = 5  # form POSTs per subscriber address per limit_window
    limit_window: float = 3600.0
    # Open HTTP connections in all and per client address (trusted proxies not counted
    # per address: every request behind them comes from them); past them a 503.
    max_connections: int = 256
    max_connections_per_ip: int = 16


def parse_web(r: Reader) -> WebConfig:
    d = WebConfig()
    base = r.str("base_url", "").strip().rstrip("/")
    metrics_listen = (
        r.hostport("metrics_listen", "127.0.0.1:9025") if r.has("metrics_listen") else None
    )
    c = WebConfig(
        enabled=r.bool("enabled", d.enabled),
        listen=r.hostport("listen", "127.0.0.1:8025"),
        base_url=base,
        trusted_proxies=r.networks("trusted_proxies", ("127.0.0.0/8", "::1/128")),
        require_one_click=r.bool("require_one_click", d.require_one_click),
        metrics=r.bool("metrics", d.metrics),
        metrics_listen=metrics_listen,
        client_limit=r.int("client_limit", d.client_limit, minimum=1),
        address_limit=r.int("address_limit", d.address_limit, minimum=1),
        limit_window=r.duration("limit_window", "1h", positive=True),
        max_connections=r.int("max_connections", d.max_connections, minimum=1),
        max_connections_per_ip=r.int("max_connections_per_ip", d.max_connections_per_ip, minimum=1),
    )
    if base:
        u = urlsplit(base)
        if (
            u.scheme not in ("https", "http")
            or not u.hostname
            or u.query
            or u.fragment
            or not (is_hostname(u.hostname) or _is_ip(u.hostname))
        ):
            r.error(
                "base_url",
                base,
                "the public URL of maild's pages, such as "
                '"https://lists.example.net/maild" (no query, no fragment)',
            )
        elif u.scheme == "http" and not _loopback(u.hostname):
            # RFC 8058 one-click URIs must be https; plain http only on a trial box.
            r.error(
                "base_url",
                base,
                "an https:// URL (RFC 8058 one-click needs https; "
                "TLS is terminated by the reverse proxy); http only for a loopback host",
            )
    if c.enabled and not base:
        r.problems.append(
            f"{r.key('base_url')} is missing: [web] enabled = true needs the public "
            'URL its pages are reached at, e.g. "https://lists.example.net/maild"'
        )
    if c.require_one_click and not c.enabled:
        r.error(
            "require_one_click",
            True,
            "false unless [web] enabled = true (maild must serve the one-click URLs it requires)",
        )
    if metrics_listen is not None and metrics_listen == c.listen:
        r.error("metrics_listen", "{}:{}".format(*metrics_listen), "an address other than listen")
    r.unknown()
    return c


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _loopback(host: str) -> bool:
    return host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)


def section(config: object) -> WebConfig:
    return getattr(config, "sections", {}).get("web") or WebConfig()


def confirm_url(config: object, token: str) -> str:
    """The confirmation page for a token, or '' when maild serves no pages."""
    w = section(config)
    return f"{w.base_url}/confirm/{token}" if w.enabled and w.base_url else ""


def _built_from(w: WebConfig) -> dict[str, str]:
    """What the listeners and routes were built from, as the status file shows it."""

    def hp(addr: tuple[str, int] | None) -> str:
        return f"{addr[0]}:{addr[1]}" if addr else ""

    return {
        "enabled": str(w.enabled).lower(),
        "listen": hp(w.listen),
        "metrics": str(w.metrics).lower(),
        "metrics_listen": hp(w.metrics_listen),
        "base_url": urlsplit(w.base_url).path,
    }


def restart_needed(running: object, file: object) -> list[dict[str, str]]:
    """[web] keys in the file that only a restart puts in effect (base_url by its path:
    its host applies at once, as do the limits, trusted_proxies and require_one_click)."""
    a, b = _built_from(section(running)), _built_from(section(file))
    why = "the web listeners and their routes are built once, at start"
    return [
        {
            "section": "web",
            "key": k + (" (path)" if k == "base_url" else ""),
            "file": b[k],
            "running": a[k],
            "why": why,
        }
        for k in a
        if a[k] != b[k]
    ]
