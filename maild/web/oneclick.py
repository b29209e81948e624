"""RFC 8058 one-click unsubscribe URLs: built, parsed and checked against a list's key.

The URL format and its MAC are described in maild.web.keys (and docs/optin.md, for
list software that builds them itself).
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from maild.web import keys


def prefix(base_url: str) -> str:
    return base_url.rstrip("/") + "/unsubscribe/"


def url(base_url: str, key: bytes, list_id: str, address: str) -> str:
    return base_url.rstrip("/") + keys.unsubscribe_path(key, list_id, address)


def parse(base_url: str, uri: str) -> tuple[str, str, str] | None:
    """(list_id, address, mac) of a maild one-click URL under base_url, else None."""
    p = prefix(base_url)
    if not base_url or uri[: len(p)].lower() != p.lower():
        return None
    path = urlsplit(uri).path
    base_path = urlsplit(p).path
    parts = path[len(base_path) :].split("/") if path.startswith(base_path) else []
    if len(parts) != 3 or not all(parts):
        return None
    address = keys.decode_address(parts[1])
    if address is None or "@" not in address:
        return None
    return unquote(parts[0]).lower(), address, parts[2]


def for_recipient(base_url: str, key: bytes, uri: str, list_id: str, address: str) -> bool:
    """Is `uri` maild's valid one-click URL for this list and recipient?"""
    got = parse(base_url, uri)
    if got is None:
        return False
    lid, addr, mac = got
    return lid == list_id.lower() and addr == address.lower() and keys.valid(key, lid, addr, mac)
