"""Secrets of the web face, kept in the state store: one-click keys per list, the CSRF key.

A one-click unsubscribe URL is

    {base_url}/unsubscribe/{list_id}/{b64url(address)}/{mac}

with `mac` = the first 32 hex digits of HMAC-SHA256(key, "maild-unsubscribe\\0" + list_id
+ "\\0" + address) and `key` the list's own 32 random bytes (`maild optin unsubscribe-key
LIST` prints them for the list software). The URL is the subscriber's capability: it
names one address on one list, cannot be forged for another, and says nothing a
recipient does not know already. Keys are created on first use (insert-if-absent, so the
daemon, the CLI and every node of a shared store agree on one key) and never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from urllib.parse import quote

from maild.store.base import Store

# The web schema, in order (maild.components hands it to the store).
MIGRATIONS = (
    """
    CREATE TABLE web_keys (
        name TEXT PRIMARY KEY,          -- 'unsubscribe:LIST_ID' or 'csrf'
        secret TEXT NOT NULL,           -- hex of 32 random bytes
        created REAL NOT NULL
    );
    """,
)

MAC_HEX = 32  # 128 bits: unguessable, and short enough for a mail header line


async def key(store: Store, name: str) -> bytes:
    """The named secret, created (once, by whoever asks first) if it does not exist."""
    await store.execute(
        "INSERT INTO web_keys(name, secret, created) VALUES (?, ?, ?) ON CONFLICT(name) DO NOTHING",
        (name, secrets.token_hex(32), time.time()),
    )
    row = await store.fetchone("SELECT secret FROM web_keys WHERE name = ?", (name,))
    assert row is not None
    return bytes.fromhex(str(row[0]))


async def all_keys(store: Store) -> dict[str, bytes]:
    return {
        str(n): bytes.fromhex(str(s))
        for n, s in await store.fetchall("SELECT name, secret FROM web_keys")
    }


def list_key_name(list_id: str) -> str:
    return f"unsubscribe:{list_id.lower()}"


def mac(k: bytes, list_id: str, address: str) -> str:
    msg = b"maild-unsubscribe\0" + list_id.lower().encode() + b"\0" + address.lower().encode()
    return hmac.new(k, msg, hashlib.sha256).hexdigest()[:MAC_HEX]


def encode_address(address: str) -> str:
    return base64.urlsafe_b64encode(address.lower().encode("utf-8")).decode("ascii").rstrip("=")


def decode_address(text: str) -> str | None:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return raw.decode("utf-8").lower() if raw else None
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def unsubscribe_path(k: bytes, list_id: str, address: str) -> str:
    lid = list_id.lower()
    return f"/unsubscribe/{quote(lid, safe='')}/{encode_address(address)}/{mac(k, lid, address)}"


def valid(k: bytes | None, list_id: str, address: str, given: str) -> bool:
    return k is not None and hmac.compare_digest(mac(k, list_id, address), given.lower())
