"""maild's state behind one interface; SQLite (aiosqlite, WAL) is the embedded default."""

from maild.store.base import Migrations, Store

__all__ = ["Migrations", "Store"]
