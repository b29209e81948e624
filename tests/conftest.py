"""Shared fixtures: real Postfix instances, smtp-sink downstreams, prerequisites.

The harness package is ``tests.harness``; it is also reachable as plain
``harness`` (same module objects, aliased below), so both
``from tests.harness.clients import swaks`` and ``from harness import require_binary``
work without loading the modules twice.

Missing prerequisites (root, postfix, smtp-sink...) skip the test locally but
fail it when ``CI=true``: in CI a skipped integration test is a hidden failure.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_TESTS = Path(__file__).resolve().parent
for _p in (str(_TESTS.parent), str(_TESTS)):
    if _p not in sys.path:
        sys.path.append(_p)

_harness = importlib.import_module("tests.harness")
sys.modules.setdefault("harness", _harness)
for _name in ("ports", "postfix", "sink", "clients"):
    sys.modules.setdefault(f"harness.{_name}", importlib.import_module(f"tests.harness.{_name}"))

from tests.harness import require_binary, require_root, skip_or_fail  # noqa: E402
from tests.harness.postfix import Postfix  # noqa: E402
from tests.harness.sink import SmtpSink  # noqa: E402

__all__ = ["require_binary", "require_root", "skip_or_fail"]

# Using any of these fixtures makes a test an integration test.
_INTEGRATION_FIXTURES = {
    "postfix",
    "postfix_factory",
    "module_postfix_factory",
    "smtp_sink_factory",
    "integration_env",
    "pg_server",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: needs real Postfix/Dovecot/swaks on this machine "
        "(a failure, not a skip, under CI=true)",
    )


# Tests that need root, a Debian package (Postfix, smtp-sink, Dovecot, PostgreSQL, chromium,
# journalctl) or a package index, wherever they are: ``make unit`` deselects them with
# ``-m "not integration"``. Directories and modules by path (relative to tests/); single
# tests by node id; the PostgreSQL half of the store tests by their parameter.
_INTEGRATION_PATHS = (
    "integration/",
    "reliability/",
    "harness/test_harness.py",
    "retention/test_dovecot.py",
    "fuzz/test_smtp_fuzz.py",
    "fuzz/test_mime_bombs_live.py",
    "test_bench_smoke.py",
    "test_makefile.py",
    "retention/test_access.py::test_journal_with_a_cursor_it_no_longer_knows_reads_since_then",
)


def _needs_the_system(item: pytest.Item) -> bool:
    fixtures = set(getattr(item, "fixturenames", ()))
    if _INTEGRATION_FIXTURES.intersection(fixtures):
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "postgresql" in callspec.params.values():
        return True
    rel = Path(str(item.path)).resolve().relative_to(_TESTS).as_posix()
    node = rel + item.nodeid[item.nodeid.find("::") :] if "::" in item.nodeid else rel
    return any(node.startswith(p) for p in _INTEGRATION_PATHS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tag every test that needs root, real servers or Debian binaries with ``integration``."""
    for item in items:
        if _needs_the_system(item):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def integration_env() -> None:
    """Root plus the Postfix tools every integration test relies on."""
    require_root()
    for name in ("postfix", "postqueue", "swaks", "smtp-sink", "smtp-source"):
        require_binary(name)


class PostfixFactory:
    """Builds (and by default starts) Postfix instances; ``close()`` stops them all."""

    def __init__(self, make_root: Callable[[str], Path]) -> None:
        self._make_root = make_root
        self.instances: list[Postfix] = []

    def __call__(self, *, start: bool = True, **kwargs: Any) -> Postfix:
        """``Postfix(<fresh dir>, **kwargs)``, started unless ``start=False``."""
        pf = Postfix(self._make_root(f"postfix{len(self.instances)}"), **kwargs)
        self.instances.append(pf)
        if start:
            pf.start()
        return pf

    def close(self) -> None:
        errors = []
        for pf in reversed(self.instances):
            try:
                pf.close()
            except Exception as e:  # keep stopping the others
                errors.append(e)
        self.instances.clear()
        if errors:
            raise errors[0]


@pytest.fixture
def postfix_factory(integration_env: None, tmp_path: Path) -> Iterator[PostfixFactory]:
    """``postfix_factory(**Postfix kwargs) -> started Postfix``; all stopped at teardown."""

    def make_root(name: str) -> Path:
        return tmp_path / name

    factory = PostfixFactory(make_root)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_postfix_factory(
    integration_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PostfixFactory]:
    """Like ``postfix_factory`` but shared by a module (Postfix start costs ~1 s).

    Only share instances between tests that use distinct addresses.
    """
    factory = PostfixFactory(lambda name: tmp_path_factory.mktemp(name))
    yield factory
    factory.close()


@pytest.fixture
def postfix(postfix_factory: PostfixFactory) -> Postfix:
    """A started front-mode Postfix (maild delivers to ``postfix.reinject_port``)."""
    return postfix_factory()


class SinkFactory:
    """Builds and starts ``SmtpSink``s (dumping to a fresh dir by default)."""

    def __init__(self, base: Path) -> None:
        self._base = base
        self.sinks: list[SmtpSink] = []

    def __call__(
        self, port: int | None = None, *, dump: bool = True, start: bool = True, **kwargs: Any
    ) -> SmtpSink:
        if dump and "dump_dir" not in kwargs:
            kwargs["dump_dir"] = self._base / f"sink{len(self.sinks)}"
        sink = SmtpSink(port, **kwargs)
        self.sinks.append(sink)
        if start:
            sink.start()
        return sink

    def close(self) -> None:
        for sink in reversed(self.sinks):
            sink.close()
        self.sinks.clear()


@pytest.fixture
def smtp_sink_factory(integration_env: None, tmp_path: Path) -> Iterator[SinkFactory]:
    """``smtp_sink_factory(port=None, *, dump=True, extra_args=()) -> started SmtpSink``."""
    factory = SinkFactory(tmp_path)
    yield factory
    factory.close()
