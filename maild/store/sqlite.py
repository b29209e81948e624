"""SQLite implementation of the state store (aiosqlite, WAL).

WAL lets `maild log` and the other CLI commands read while `maild serve` writes;
synchronous=NORMAL keeps commits cheap (WAL stays consistent on power loss, losing at
most the last transactions of decision-log rows, never corrupting the file).

SQLite writes its WAL index through a shared mapping of the `-shm` file. When that
file cannot be written (immutable, a filesystem remounted read-only) the write is a
SIGBUS that kills the process, not an error SQLite could return; so every call first
asks the kernel whether the file is writable and fails with a StoreError if not.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import aiosqlite

from maild.store.base import Health, Migrations, StoreError

log = logging.getLogger("maild.store")

INIT_FLAG = "--init-state"
_HEADER = b"SQLite format 3\0"
# Errors of the statement or the caller, not of the store: they say nothing about health.
_NOT_HEALTH = (
    sqlite3.IntegrityError,
    sqlite3.ProgrammingError,
    sqlite3.InterfaceError,
    sqlite3.DataError,
)


class StateRefused(StoreError):
    """An existing state file that maild will not start over (empty, damaged, not ours)."""


def _unusable(path: str, what: str) -> StateRefused:
    return StateRefused(
        f"state store {path} {what}: refusing to start over it, which would drop the "
        f"sanctions and the consent ledger; restore it from a backup, or start once with "
        f"`maild serve {INIT_FLAG}` to move it aside and begin an empty state"
    )


class SQLiteStore:
    dialect = "sqlite"

    def __init__(
        self,
        path: str,
        *,
        migrations: Migrations,
        migrate: bool = True,
        check: bool = False,
        init: bool = False,
    ):
        self.path = path
        self.migrations = migrations
        self.shm = path + "-shm"
        self.migrate = migrate
        self.check, self.init = check, init
        self.health = Health(path)
        self.db: aiosqlite.Connection | None = None
        # One connection: a transaction() holds the lock so that no other task's commit
        # lands in the middle of it; calls made inside the block skip the lock.
        self._tx_lock = asyncio.Lock()
        self._in_tx: contextvars.ContextVar[bool] = contextvars.ContextVar(
            f"maild-sqlite-{id(self)}", default=False
        )

    def _shm_writable(self) -> None:
        """Raise (instead of letting SQLite fault) when the -shm file cannot be written."""
        if os.access(self.shm, os.W_OK, effective_ids=True) or not os.path.exists(self.shm):
            return
        why = "its filesystem is read-only"
        with contextlib.suppress(OSError):
            if not os.statvfs(self.shm).f_flag & os.ST_RDONLY:
                why = "it is immutable or its permissions forbid it"
        raise StoreError(
            f"state store {self.path}: cannot write {self.shm} ({why}): "
            "SQLite cannot update its WAL index"
        )

    def _error(self, e: Exception) -> StoreError:
        err = e if isinstance(e, StoreError) else StoreError(f"state store {self.path}: {e}")
        if not isinstance(e, _NOT_HEALTH):
            self.health.failed(str(err))
        return err

    @contextlib.asynccontextmanager
    async def _guard(self, write: bool = False) -> AsyncIterator[aiosqlite.Connection]:
        """One call: serialised with transactions, the -shm file checked first, errors
        turned into StoreError and the store's health updated (writes only succeed)."""
        in_tx = self._in_tx.get()
        try:
            async with contextlib.nullcontext() if in_tx else self._tx_lock:
                self._shm_writable()
                yield self._conn()
        except (sqlite3.Error, StoreError) as e:
            raise self._error(e) from e
        if write and not in_tx:
            self.health.wrote()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Run the calls inside the block in one transaction (BEGIN IMMEDIATE)."""
        if self._in_tx.get():
            yield
            return
        async with self._tx_lock:
            token = self._in_tx.set(True)
            try:
                async with self._guard() as db:
                    await db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    with contextlib.suppress(sqlite3.Error, StoreError):
                        self._shm_writable()
                        await self._conn().rollback()
                    raise
                async with self._guard() as db:
                    await db.commit()
                self.health.wrote()
            finally:
                self._in_tx.reset(token)

    async def xact_lock(self, name: str) -> None:
        """BEGIN IMMEDIATE already holds SQLite's one write lock: nothing more to take."""

    async def _commit(self) -> None:
        if not self._in_tx.get():
            await self._conn().commit()

    async def open(self) -> None:
        try:
            await self._open()
        except StateRefused:
            if not self.init:
                raise
            self._move_aside()
            await self._open()
        if os.path.exists(self.path):
            os.chmod(self.path, 0o640)

    async def _open(self) -> None:
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            if not os.path.exists(self.path):
                _create(self.path)
            else:
                self._check_file()
            self._shm_writable()
            self.db = await aiosqlite.connect(self.path, timeout=5.0)
            await self.db.execute("PRAGMA journal_mode=WAL")
            await self.db.execute("PRAGMA synchronous=NORMAL")
            await self.db.execute("PRAGMA foreign_keys=ON")
            await self._check_contents()
            if self.migrate:
                await self._migrate()
        except (OSError, sqlite3.Error, StoreError) as e:
            await self.close()
            if isinstance(e, StoreError):
                raise
            if type(e) is sqlite3.DatabaseError:  # SQLITE_CORRUPT, SQLITE_NOTADB
                raise _unusable(self.path, f"is damaged ({e})") from e
            raise StoreError(f"cannot open state store {self.path}: {e}") from e

    def _check_file(self) -> None:
        """Before SQLite opens it: an empty file or one that is not SQLite is refused
        (SQLite would take an empty file for a new database)."""
        with open(self.path, "rb") as f:
            head = f.read(len(_HEADER))
        if not head:
            raise _unusable(self.path, "is empty (0 bytes)")
        if head != _HEADER:
            raise _unusable(self.path, "is not a SQLite database")

    async def _check_contents(self) -> None:
        """A database that holds no maild state is refused too; with check (the daemon's
        start) so is a damaged one: SQLite's quick_check reads every page, ~1 s a GB."""
        assert self.db is not None
        verdict = "ok"
        if self.check:
            async with self.db.execute("PRAGMA quick_check(1)") as cur:
                verdict = (await cur.fetchone() or ("no answer",))[0]
        async with self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ) as cur:
            ours = await cur.fetchone() is not None
        if verdict != "ok":
            raise _unusable(self.path, f"is damaged (SQLite quick_check: {verdict})")
        if not ours:
            raise _unusable(self.path, "holds no maild state (no schema_version table)")

    def _move_aside(self) -> None:
        """--init-state: keep the refused file (and its WAL) for inspection, never delete it."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = f"{self.path}.refused-{stamp}"
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path + suffix, aside + suffix)
        log.warning(
            "state store: moved %s aside to %s (%s); starting an empty state",
            self.path,
            aside,
            INIT_FLAG,
        )

    async def close(self) -> None:
        if self.db is None:
            return
        db, self.db = self.db, None
        try:
            self._shm_writable()
        except StoreError as e:
            _abandon(db)
            log.error(
                "error: %s; the state is left open, SQLite recovers it from the WAL at "
                "the next start",
                e,
            )
            return
        await db.close()

    async def _migrate(self) -> None:
        assert self.db is not None
        await self.db.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        current = await self.schema_versions()
        for component, scripts in self.migrations.items():
            have = current.get(component, 0)
            if have > len(scripts):
                raise StoreError(
                    f"state store {self.path} has {component} schema v{have}, newer than this "
                    f"maild knows (v{len(scripts)}): upgrade maild or restore a matching state"
                )
            for version in range(have + 1, len(scripts) + 1):
                await self.db.executescript(
                    "BEGIN;\n" + scripts[version - 1] + "\n"
                    f"INSERT INTO schema_version(component, version) VALUES ('{component}', {version})"
                    f" ON CONFLICT(component) DO UPDATE SET version = {version};\nCOMMIT;"
                )
        await self.db.commit()

    async def schema_versions(self) -> dict[str, int]:
        rows = await self.fetchall("SELECT component, version FROM schema_version")
        return {c: v for c, v in rows}

    def _conn(self) -> aiosqlite.Connection:
        if self.db is None:
            raise StoreError("state store is not open")
        return self.db

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self._guard(write=True) as db:
            cur = await db.execute(sql, params)
            await self._commit()
            return cur.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with self._guard(write=True) as db:
            await db.executemany(sql, rows)
            await self._commit()

    # No row_factory is set, so sqlite3 returns plain tuples (aiosqlite annotates them as Row).
    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        async with self._guard() as db, db.execute(sql, params) as cur:
            return list(cast("Iterable[tuple]", await cur.fetchall()))

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        async with self._guard() as db, db.execute(sql, params) as cur:
            return cast("tuple | None", await cur.fetchone())


def _create(path: str) -> None:
    """A missing state is created complete under a temporary name, then renamed: a crash
    during creation never leaves an empty file that the next start would refuse."""
    tmp = f"{path}.new"
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp + suffix)
    con = sqlite3.connect(tmp)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        con.commit()
    finally:
        con.close()  # the last connection checkpoints and removes the -wal and -shm
    os.replace(tmp, path)


def _abandon(db: aiosqlite.Connection) -> None:
    """Stop aiosqlite's thread without closing SQLite: closing the last connection
    checkpoints through the -shm mapping, a SIGBUS when that file cannot be written.
    The connection is kept referenced so that no finaliser closes it at exit."""
    conn = db._connection
    if conn is not None:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))
    db._connection = None
    db._running = False
    db._tx.put_nowait((None, lambda: aiosqlite.core._STOP_RUNNING_SENTINEL))
