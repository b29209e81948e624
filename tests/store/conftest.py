"""The store-level tests run against both backends: SQLite and a real PostgreSQL."""

from __future__ import annotations

import itertools

import pytest

import maild.antispam.limiter  # noqa: F401  (register every component's schema)
import maild.antispam.sanctions  # noqa: F401
import maild.optin.ledger  # noqa: F401
import maild.retention.state  # noqa: F401
from maild.components import open_store
from tests.harness.postgres import Postgres, need_postgres

_dbs = itertools.count()


@pytest.fixture(scope="session")
def pg_server():
    pg = Postgres(need_postgres()).start()
    yield pg
    pg.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request, tmp_path):
    """A fresh, empty state: a SQLite file, or a new database on the shared server."""
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    pg = request.getfixturevalue("pg_server")
    return pg.create_db(f"t{next(_dbs)}")


@pytest.fixture
async def store(state_url):
    s = await open_store(state_url)
    yield s
    await s.close()
