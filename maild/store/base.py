"""The state interface every component uses.

Each component (core decision log, rate-limit counters, retention, ...) declares its
own ordered list of migrations as plain data; the composition root (maild.components)
hands all of them to the store, which applies the ones not yet applied, in order, and
records the version per component. A component reads and writes
through the small SQL surface below (execute / executemany / fetchall / fetchone), so
that it never holds a connection of its own and a second backend only has to provide
these few calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("maild.store")

# component -> ordered SQL scripts; index + 1 is the schema version after applying it.
# A component appends new scripts and never edits a released one.
Migrations = Mapping[str, Sequence[str]]


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
            log.error(
                "error: state store: unavailable, mail is answered 451 4.3.0 until a "
                "write succeeds: %s",
                cause,
            )


class Store(Protocol):
    path: str
    health: Health
    dialect: str  # "sqlite" or "postgresql": for the rare query whose SQL must differ

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
        state = state[len("sqlite:") :]
    p = Path(state)
    if not p.is_absolute():
        p = Path(config_path).resolve().parent / p
    return str(p)
