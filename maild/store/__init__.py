"""maild's state behind one interface; SQLite (aiosqlite, WAL) is the embedded default."""

from maild.store.base import Store, open_store, register_migrations

__all__ = ["Store", "open_store", "register_migrations"]
