"""Open the state store `[server] state` names, with the schemas it is given."""

from __future__ import annotations

from maild.store.base import Migrations, Store, is_postgres, resolve_state_path


async def open_store(
    state: str,
    config_path: str = ".",
    *,
    migrations: Migrations,
    migrate: bool = True,
    check: bool = False,
    init: bool = False,
) -> Store:
    """Open the store named by `[server] state` and bring the schemas in migrations up to
    date: `postgresql://...` for several nodes sharing one state, else a SQLite file.

    A SQLite file that exists but is empty or not maild's is refused (and, with check,
    the daemon's start, a damaged one), unless init: that moves it aside, starts anew."""
    store: Store
    if is_postgres(state):
        from maild.store.postgres import PostgresStore

        store = PostgresStore(state, migrations=migrations, migrate=migrate)
    else:
        from maild.store.sqlite import SQLiteStore

        store = SQLiteStore(
            resolve_state_path(state, config_path),
            migrations=migrations,
            migrate=migrate,
            check=check,
            init=init,
        )
    await store.open()
    return store
