"""Leases: a named right to work on something (a mailbox), held by one node at a time.

Several maild nodes share one PostgreSQL store but not one lock directory, so a file
lock cannot keep two nodes' retention runs off the same mailbox. A lease is a row
(name, owner, expires) taken with one atomic UPSERT that succeeds only when the row is
free, expired, or already ours; it is deleted on release, and a crashed node's lease
simply expires (`ttl`), after which another node may take the mailbox over.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

from maild.store.base import Store

# The leases schema, in order (maild.components hands it to the store).
MIGRATIONS = (
    """
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        expires REAL NOT NULL
    );
    """,
)

OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def acquire(
    store: Store, name: str, *, ttl: float, owner: str = OWNER, now: float | None = None
) -> bool:
    """Take the lease if it is free, expired or ours; True when this owner holds it."""
    now = time.time() if now is None else now
    row = await store.fetchone(
        "INSERT INTO leases(name, owner, expires) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE "
        "SET owner = excluded.owner, expires = excluded.expires "
        "WHERE leases.expires < ? OR leases.owner = ? RETURNING owner",
        (name, owner, now + ttl, now, owner),
    )
    return row is not None and row[0] == owner


async def release(store: Store, name: str, *, owner: str = OWNER) -> None:
    await store.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))
