"""Fixtures for fault injection and load: private Postfix instances, maild processes that
the tests may SIGKILL and restart, and the opt-in `slow` marker.

`@pytest.mark.slow` marks the long soak variants: they run only with MAILD_SLOW=1, so the
default run (and CI) stays within its time budget; every slow test has a short sibling
that runs by default.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.maild import Maild
from tests.integration.conftest import need


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: long soak/load variant, skipped unless MAILD_SLOW=1 (see docs/reliability.md)",
    )


@pytest.fixture(autouse=True)
def _slow_is_opt_in(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("slow") and os.environ.get("MAILD_SLOW") != "1":
        pytest.skip("slow variant: set MAILD_SLOW=1 to run it")


@pytest.fixture(scope="session")
def tools() -> None:
    """Root, Postfix and the tools the fault tests drive (a failure under CI=true)."""
    need("postfix", "postqueue", "smtp-sink", "chattr", "mount")


class MaildFactory:
    """Starts `maild serve` processes; stops (or reaps) every one at teardown."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.instances: list[Maild] = []

    def __call__(
        self, policy: dict, *, root: Path | None = None, port: int | None = None, start: bool = True
    ) -> Maild:
        root = root or self.base / f"maild{len(self.instances)}"
        m = Maild(root, policy, port=port)
        self.instances.append(m)
        if start:
            m.start()
        return m

    def restart(self, m: Maild) -> Maild:
        """A new process on the same port, state and policies.toml (after a crash)."""
        m.stop(signal.SIGKILL)
        return self(m.policy, root=m.root, port=m.port)

    def close(self) -> None:
        for m in reversed(self.instances):
            m.stop()


@pytest.fixture
def maild_factory(tools: None, tmp_path: Path) -> Iterator[MaildFactory]:
    f = MaildFactory(tmp_path)
    yield f
    f.close()
