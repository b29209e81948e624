"""Single-use confirmation tokens: 160 random bits, stored only as a hash.

The token travels in the address confirm+TOKEN@<list domain>, so it is lower-case
base32 (local parts may be case-folded on the way) and hashed with a fixed prefix; the
ledger, the logs and the evidence bundle only ever hold the hash.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

TOKEN_BYTES = 20


def new_token() -> str:
    return base64.b32encode(secrets.token_bytes(TOKEN_BYTES)).decode("ascii").rstrip("=").lower()


def token_hash(token: str) -> str:
    return hashlib.sha256(b"maild-optin-token:" + token.strip().lower().encode("utf-8")).hexdigest()


def short(h: str) -> str:
    """What a log line shows of a hash."""
    return h[:12]
