"""A private PostgreSQL server for tests: Debian's postgresql, initdb'd into a temp dir.

It listens on a free loopback port (and a socket in its own directory), runs as the
`postgres` user (initdb refuses root), and is stopped and removed at teardown. Tests
that need it call `need_postgres()`: under CI=true a missing server is a failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.harness.ports import free_port


def pg_bindir() -> str | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb, if any."""
    dirs = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    return str(Path(dirs[-1]).parent) if dirs else None


def need_postgres() -> str:
    """The bin directory, or skip (fail under CI=true) when PostgreSQL or root is missing."""
    ci = os.environ.get("CI") == "true"
    bindir = pg_bindir()
    if bindir is None:
        if ci:
            pytest.fail("postgresql is not installed: CI must install it (make deps)")
        pytest.skip("postgresql not installed")
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        if ci:
            pytest.fail("asyncpg is not installed: pip install -e '.[test]'")
        pytest.skip("asyncpg not installed")
    if os.geteuid() != 0:
        if ci:
            pytest.fail("the PostgreSQL harness needs root (to run the server as postgres)")
        pytest.skip("the PostgreSQL harness needs root")
    return bindir


class Postgres:
    """initdb + pg_ctl start on 127.0.0.1:<port>; `url(db)` for maild; stop() removes it."""

    def __init__(self, bindir: str, root: str | None = None):
        self.bindir = bindir
        self.root = Path(root or tempfile.mkdtemp(prefix="maild-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.port = free_port()
        self.started = False

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
            cwd="/",
        )

    def start(self) -> Postgres:
        if not self.data.exists():
            self.sock.mkdir(parents=True, exist_ok=True)
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sock, "postgres")
            self.root.chmod(0o755)
            self._run(
                f"{self.bindir}/initdb",
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            )
            with open(self.data / "postgresql.conf", "a") as f:
                f.write(
                    f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.sock}'\nfsync = off\n"
                    "synchronous_commit = off\nfull_page_writes = off\n"
                    "max_connections = 200\n"
                )
        self._run(
            f"{self.bindir}/pg_ctl",
            "-D",
            str(self.data),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.root / "server.log"),
            "start",
        )
        self.started = True
        return self

    def stop(self) -> None:
        if self.started:
            self._run(
                f"{self.bindir}/pg_ctl",
                "-D",
                str(self.data),
                "-w",
                "-t",
                "60",
                "-m",
                "fast",
                "stop",
                check=False,
            )
            self.started = False

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def psql(self, sql: str, db: str = "postgres") -> str:
        r = self._run(
            f"{self.bindir}/psql",
            "-h",
            str(self.sock),
            "-p",
            str(self.port),
            "-d",
            db,
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        )
        return r.stdout

    def create_db(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"
