"""`maild migrate-state`: move a single node's SQLite state into PostgreSQL.

Every table of every component's schema is copied row by row in id order, in one
PostgreSQL transaction (all or nothing), after the target's schema is created by the
same migrations; identity sequences are then moved past the copied ids. The target must
be empty: merging two states would break the consent hash chains' order.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import click

from maild.clitools import wiring
from maild.store.base import StoreError, is_postgres
from maild.wiring import Wiring

_BATCH = 1000


async def migrate(
    parts: Wiring, src_url: str, dst_url: str, *, echo: Callable[[str], None] = print
) -> dict[str, int]:
    """Copy every table of src (SQLite) into dst (PostgreSQL); returns rows per table."""
    src = await parts.open_store(src_url)  # brings an older single-node state up to date first
    dst = await parts.open_store(dst_url)
    counts: dict[str, int] = {}
    try:
        tables = [
            r[0]
            for r in await src.fetchall(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
                "AND name != 'schema_version' ORDER BY name"
            )
        ]
        for t in tables:
            row = await dst.fetchone(f"SELECT COUNT(*) FROM {t}")
            if row and row[0]:
                raise StoreError(f"target table {t} is not empty: migrate into a new database")
        async with dst.transaction():
            for t in tables:
                info = await src.fetchall(f"PRAGMA table_info({t})")
                cols = [r[1] for r in info]
                identity = any(
                    r[1] == "id" and r[5] and str(r[2]).upper() == "INTEGER" for r in info
                )
                quoted = ", ".join(f'"{c}"' for c in cols)
                order = " ORDER BY id" if "id" in cols else ""
                insert = f"INSERT INTO {t}({quoted}) VALUES ({', '.join('?' * len(cols))})"
                n, offset = 0, 0
                while True:
                    rows = await src.fetchall(
                        f"SELECT {quoted} FROM {t}{order} LIMIT ? OFFSET ?", (_BATCH, offset)
                    )
                    if not rows:
                        break
                    await dst.executemany(insert, rows)
                    n += len(rows)
                    offset += len(rows)
                counts[t] = n
                if identity:  # new rows must not reuse a copied id
                    await dst.fetchone(
                        f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), "
                        f"COALESCE((SELECT MAX(id) FROM {t}), 0) + 1, false)"
                    )
                echo(f"{t}: {n} rows")
    finally:
        await src.close()
        await dst.close()
    return counts


@click.command("migrate-state")
@click.option("--from", "src", required=True, help="sqlite:/path/to/maild.db")
@click.option("--to", "dst", required=True, help="postgresql://user@host/db (empty)")
def migrate_state(src: str, dst: str) -> None:
    """Copy a single node's SQLite state into an empty PostgreSQL database."""
    if is_postgres(src) or not is_postgres(dst):
        raise click.UsageError("--from must be a SQLite state, --to a postgresql:// URL")
    try:
        counts = asyncio.run(migrate(wiring(), src, dst, echo=click.echo))
    except StoreError as e:
        click.echo(f"maild: migrate-state: {e}", err=True)
        sys.exit(1)
    click.echo(
        f"migrated {sum(counts.values())} rows in {len(counts)} tables; stop the "
        "single node and set [server] state to the URL on every node"
    )
