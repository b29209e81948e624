"""The state interface every component uses, and the schema-migration registry.

Each component (core decision log, rate-limit counters, retention, ...) registers its
own ordered list of migrations under its name; the store applies the ones not yet
applied, in order, and records the version per component. A component reads and writes
through the small SQL surface below (execute / executemany / fetchall / fetchone), so
that it never holds a connection of its own and a second backend only has to provide
these few calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("maild.store")

# component -> ordered SQL scripts; index + 1 is the schema version after applying it.
MIGRATIONS: dict[str, list[str]] = {}


def register_migrations(component: str, scripts: Sequence[str]) -> None:
    """Declare a component's schema. Append new scripts; never edit a released one."""
    MIGRATIONS[component] = list(scripts)


class StoreError(Exception):
    """The state store failed; callers answer 4xx (tempfail), never accept unchecked."""

    raised = 0  # errors since start, every caller alike (/metrics)

    def __init__(self, *args: object):
        StoreError.raised += 1
        super().__init__(*args)


class Health:
    """Whether the store takes writes, judged only by writes: any failed call makes it
    failing, only a successful write makes it healthy again. While it fails the proxy
    answers 451 4.3.0, so nothing is accepted that maild could not record. Each change
    is one log line (the cause once per outage, not once per retry)."""

    def __init__(self, name: str):
        self.name = name
        self.ok = True
        self.cause = ""
        self.last_write = time.monotonic()

    def wrote(self) -> None:
        self.last_write = time.monotonic()
        if not self.ok:
            self.ok, self.cause = True, ""
            log.warning("state store: available again: %s", self.name)

    def failed(self, cause: str) -> None:
        if self.ok:
            self.ok, self.cause = False, cause
            log.error("error: state store: unavailable, mail is answered 451 4.3.0 until a "
                      "write succeeds: %s", cause)


class Store(Protocol):
    path: str
    health: Health

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...
    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...
    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]: ...
    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple | None: ...
    async def schema_versions(self) -> dict[str, int]: ...

    def transaction(self) -> AbstractAsyncContextManager[None]:
        """The calls made inside the block commit (or roll back) together."""
        ...

    async def xact_lock(self, name: str) -> None:
        """Inside transaction(): wait for the lock on name, held until the block ends.
        Serialises writers across nodes (PostgreSQL); SQLite's BEGIN IMMEDIATE already
        serialises every writer of its one file."""
        ...


def is_postgres(state: str) -> bool:
    return state.startswith(("postgresql://", "postgres://"))


def resolve_state_path(state: str, config_path: str) -> str:
    """A relative state path is relative to the directory of policies.toml.

    For a postgresql:// state, the shared state is in the database, but each node still
    keeps local files (its status file, its lock directory) next to where a SQLite state
    would be: `var/maild.pg` beside policies.toml, a name that is never created itself.
    """
    if is_postgres(state):
        return str(Path(config_path).resolve().parent / "var" / "maild.pg")
    if state.startswith("sqlite:"):
        state = state[len("sqlite:"):]
    p = Path(state)
    if not p.is_absolute():
        p = Path(config_path).resolve().parent / p
    return str(p)


async def open_store(state: str, config_path: str = ".", *, migrate: bool = True,
                     check: bool = False, init: bool = False) -> Store:
    """Open the store named by `[server] state` and bring its schema up to date:
    `postgresql://...` for several nodes sharing one state, else a SQLite file.

    A SQLite file that exists but is empty or not maild's is refused (and, with check,
    the daemon's start, a damaged one), unless init: that moves it aside, starts anew."""
    from maild.store import core, leases  # noqa: F401  (register their schemas)

    store: Store
    if is_postgres(state):
        from maild.store.postgres import PostgresStore

        store = PostgresStore(state, migrate=migrate)
    else:
        from maild.store.sqlite import SQLiteStore

        store = SQLiteStore(resolve_state_path(state, config_path), migrate=migrate,
                            check=check, init=init)
    await store.open()
    return store
