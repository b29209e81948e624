"""SQLite implementation of the state store (aiosqlite, WAL).

WAL lets `maild log` and the other CLI commands read while `maild serve` writes;
synchronous=NORMAL keeps commits cheap (WAL stays consistent on power loss, losing at
most the last transactions of decision-log rows, never corrupting the file).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from maild.store.base import MIGRATIONS, StoreError


class SQLiteStore:
    dialect = "sqlite"

    def __init__(self, path: str, *, migrate: bool = True):
        self.path = path
        self.migrate = migrate
        self.db: aiosqlite.Connection | None = None
        # One connection: a transaction() holds the lock so that no other task's commit
        # lands in the middle of it; calls made inside the block skip the lock.
        self._tx_lock = asyncio.Lock()
        self._in_tx: contextvars.ContextVar[bool] = contextvars.ContextVar(
            f"maild-sqlite-{id(self)}", default=False)

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        if self._in_tx.get():
            yield
            return
        async with self._tx_lock:
            yield

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Run the calls inside the block in one transaction (BEGIN IMMEDIATE)."""
        if self._in_tx.get():
            yield
            return
        async with self._tx_lock:
            token = self._in_tx.set(True)
            try:
                try:
                    await self._conn().execute("BEGIN IMMEDIATE")
                except sqlite3.Error as e:
                    raise StoreError(f"state store {self.path}: {e}") from e
                try:
                    yield
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        await self._conn().rollback()
                    raise
                try:
                    await self._conn().commit()
                except sqlite3.Error as e:
                    raise StoreError(f"state store {self.path}: {e}") from e
            finally:
                self._in_tx.reset(token)

    async def xact_lock(self, name: str) -> None:
        """BEGIN IMMEDIATE already holds SQLite's one write lock: nothing more to take."""

    async def _commit(self) -> None:
        if not self._in_tx.get():
            await self._conn().commit()

    async def open(self) -> None:
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            self.db = await aiosqlite.connect(self.path, timeout=5.0)
            await self.db.execute("PRAGMA journal_mode=WAL")
            await self.db.execute("PRAGMA synchronous=NORMAL")
            await self.db.execute("PRAGMA foreign_keys=ON")
            if self.migrate:
                await self._migrate()
        except (OSError, sqlite3.Error) as e:
            await self.close()
            raise StoreError(f"cannot open state store {self.path}: {e}") from e
        if os.path.exists(self.path):
            os.chmod(self.path, 0o640)

    async def close(self) -> None:
        if self.db is not None:
            try:
                await self.db.close()
            finally:
                self.db = None

    async def _migrate(self) -> None:
        assert self.db is not None
        await self.db.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        current = await self.schema_versions()
        for component, scripts in MIGRATIONS.items():
            have = current.get(component, 0)
            if have > len(scripts):
                raise StoreError(
                    f"state store {self.path} has {component} schema v{have}, newer than this "
                    f"maild knows (v{len(scripts)}): upgrade maild or restore a matching state")
            for version in range(have + 1, len(scripts) + 1):
                await self.db.executescript(
                    "BEGIN;\n" + scripts[version - 1] + "\n"
                    f"INSERT INTO schema_version(component, version) VALUES ('{component}', {version})"
                    f" ON CONFLICT(component) DO UPDATE SET version = {version};\nCOMMIT;")
        await self.db.commit()

    async def schema_versions(self) -> dict[str, int]:
        rows = await self.fetchall("SELECT component, version FROM schema_version")
        return {c: v for c, v in rows}

    def _conn(self) -> aiosqlite.Connection:
        if self.db is None:
            raise StoreError("state store is not open")
        return self.db

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        try:
            async with self._guard():
                cur = await self._conn().execute(sql, params)
                await self._commit()
                return cur.rowcount
        except sqlite3.Error as e:
            raise StoreError(f"state store {self.path}: {e}") from e

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            async with self._guard():
                await self._conn().executemany(sql, rows)
                await self._commit()
        except sqlite3.Error as e:
            raise StoreError(f"state store {self.path}: {e}") from e

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        try:
            async with self._guard(), self._conn().execute(sql, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as e:
            raise StoreError(f"state store {self.path}: {e}") from e

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        try:
            async with self._guard(), self._conn().execute(sql, params) as cur:
                return await cur.fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"state store {self.path}: {e}") from e
