"""Fixtures for the retention tests: a mail store under tmp_path and maild's state store."""

from __future__ import annotations

import pytest

from maild.components import open_store
from maild.retention import state as _state  # noqa: F401  (registers the schema)


@pytest.fixture
def mail(tmp_path):
    p = tmp_path / "vmail"
    p.mkdir()
    return p


@pytest.fixture
async def store(tmp_path):
    s = await open_store(str(tmp_path / "state.db"), str(tmp_path / "policies.toml"))
    yield s
    await s.close()
