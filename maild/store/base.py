"""The state interface every component uses, and the schema-migration registry.

Each component (core decision log, rate-limit counters, retention, ...) registers its
own ordered list of migrations under its name; the store applies the ones not yet
applied, in order, and records the version per component. A component reads and writes
through the small SQL surface below (execute / executemany / fetchall / fetchone), so
that it never holds a connection of its own and a second backend only has to provide
these few calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

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


class Store(Protocol):
    path: str

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


async def open_store(state: str, config_path: str = ".", *, migrate: bool = True) -> Store:
    """Open the store named by `[server] state` and bring its schema up to date:
    `postgresql://...` for several nodes sharing one state, else a SQLite file."""
    from maild.store import core, leases  # noqa: F401  (register their schemas)

    store: Store
    if is_postgres(state):
        from maild.store.postgres import PostgresStore

        store = PostgresStore(state, migrate=migrate)
    else:
        from maild.store.sqlite import SQLiteStore

        store = SQLiteStore(resolve_state_path(state, config_path), migrate=migrate)
    await store.open()
    return store
