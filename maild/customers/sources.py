"""[customer_source]: where customers come from besides policies.toml, read off the event loop.

A source's load() is plain blocking code (the daemon runs it in a thread, the CLI calls
it directly) that returns every source customer now, at its last good version: a file or
a row that does not parse is reported with its name, key and fix, and the version in
force before stays. load() does not change the source's memory of what it read; the
caller commit()s a load it accepted (a refresh refused for shrinking is read again next
time, and said again).

* files: one NAME.toml per customer, the keys of a [[customers]] table. A refresh stats
  every file and parses only those whose size, mtime or inode changed.
* postgresql: a query returning one row per network, login, domain or address (column
  names in ROW_COLUMNS, as Dovecot's userdb queries return named fields). The rows of
  the last good answer are kept on disk (0600, written atomically) so that a restart
  during a database outage still knows the customers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import stat
import tempfile
import time
import tomllib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from maild.config import Config, Customer, CustomerSource, Reader, parse_customer
from maild.log import clean
from maild.store.base import resolve_state_path

# Columns of a postgresql row and of an import CSV: one value each (several in a cell of
# a CSV, separated by spaces; an array column in SQL); NULL or empty is no value.
ROW_COLUMNS = {
    "name": "name",
    "network": "networks",
    "login": "logins",
    "domain": "domains",
    "address": "addresses",
    "contact": "contact",
    "tier": "tier",
}
# A column holding the other [[customers]] keys of a customer as a JSON object
# ({"ratelimit": {"messages": ["500/1h"]}, "permitted": [...]}).
SETTINGS_COLUMN = "settings"
_SINGLE = ("name", "contact", "tier")
MAX_FILE = 1024 * 1024  # a customer file larger than this is a mistake, not a customer


class SourceError(Exception):
    """The source cannot be read at all (a missing directory, an unreachable database)."""


@dataclass
class Loaded:
    customers: tuple[Customer, ...]
    problems: list[str] = field(default_factory=list)  # log lines
    note: str = ""  # "files /etc/maild/customers.d: 10000 customers, 1 broken"
    changed: bool = True  # anything that would change the index
    state: Any = None  # what commit() keeps


def customer_from(
    table: dict[str, Any], keys: Mapping[str, Any], origin: str, where: str, default_name: str = ""
) -> tuple[Customer | None, list[str]]:
    """A customer table parsed as policies.toml parses [[customers]]; problems name `where`."""
    problems: list[str] = []
    c = parse_customer(Reader(table, "", problems), keys, origin, default_name)
    return (None, [f"{where}: {p}" for p in problems]) if problems else (c, [])


def group_rows(
    rows: Iterable[Mapping[str, Any]], where: str
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Rows of ROW_COLUMNS (and SETTINGS_COLUMN) into one customer table per name."""
    tables: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for i, row in enumerate(rows, 1):
        unknown = sorted(set(row) - set(ROW_COLUMNS) - {SETTINGS_COLUMN})
        if unknown:
            problems.append(
                f"{where}: unknown column(s) {', '.join(unknown)}: expected "
                + ", ".join([*ROW_COLUMNS, SETTINGS_COLUMN])
            )
            return {}, problems
        name = _text(row.get("name"))
        if not name:
            problems.append(f"{where}: row {i}: no name: every row needs the customer's name")
            continue
        t = tables.setdefault(name, {"name": name})
        for col, key in ROW_COLUMNS.items():
            if col == "name":
                continue
            for v in _values(row.get(col)):
                if col in _SINGLE:
                    if t.setdefault(key, v) != v:
                        problems.append(
                            f"{where}: row {i}: customer {name}: {col} {v!r} differs from "
                            f"{t[key]!r} in an earlier row; keeping {t[key]!r}"
                        )
                else:
                    lst = t.setdefault(key, [])
                    if v not in lst:
                        lst.append(v)
        settings = row.get(SETTINGS_COLUMN)
        if settings:
            try:
                extra = json.loads(settings) if isinstance(settings, str) else settings
                if not isinstance(extra, dict):
                    raise ValueError
            except ValueError:
                problems.append(
                    f"{where}: row {i}: customer {name}: {SETTINGS_COLUMN} is not a JSON object "
                    'such as {"tier": "bulk"}'
                )
                continue
            for k, v in extra.items():
                t.setdefault(k, v)
    return tables, problems


def _text(v: Any) -> str:
    return "" if v is None else str(v).strip()


def _values(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, list | tuple):
        return [s for x in v for s in _values(x)]
    if isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return [str(v)]
    return str(v).split()


def base_dir(config: Config) -> Path:
    return Path(config.path).resolve().parent


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class _Seen:
    key: tuple[int, int, int]
    customer: Customer | None  # the last good version (None: never parsed)


class FilesSource:
    kind = "files"

    def __init__(self, settings: CustomerSource, config: Config):
        self.settings = settings
        p = Path(settings.path)
        self.dir = p if p.is_absolute() else base_dir(config) / p
        self._seen: dict[str, _Seen] = {}

    def describe(self) -> str:
        return f"files {self.dir}"

    def load(self) -> Loaded:
        try:
            entries = list(os.scandir(self.dir))
        except OSError as e:
            raise SourceError(f"cannot read {self.dir}: {e.strerror or e}") from None
        seen: dict[str, _Seen] = {}
        problems: list[str] = []
        changed = False
        for entry in entries:
            if not entry.name.endswith(".toml") or entry.name.startswith("."):
                continue  # editors' and provisioning tools' temporary files
            try:
                st = entry.stat()
            except OSError:
                continue  # removed while we listed it
            if not stat.S_ISREG(st.st_mode):
                continue
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            old = self._seen.get(entry.name)
            if old is not None and old.key == key:
                seen[entry.name] = old
                continue
            c, errs = self._parse(Path(entry.path), st.st_size)
            if c is not None:
                seen[entry.name] = _Seen(key, c)
                changed = changed or old is None or old.customer != c or _ext(old.customer, c)
                continue
            kept = old.customer if old is not None else None
            tail = "; the version in force stays" if kept else "; not loaded"
            problems.extend(e + tail for e in errs)
            seen[entry.name] = _Seen(key, kept)
        changed = changed or any(n not in seen for n in self._seen)
        customers = tuple(s.customer for s in seen.values() if s.customer is not None)
        broken = sum(1 for s in seen.values() if s.customer is None)
        note = f"{self.describe()}: {len(customers)} customers"
        if broken:
            note += f", {broken} file(s) not loaded"
        return Loaded(customers, problems, note, changed, seen)

    def _parse(self, path: Path, size: int) -> tuple[Customer | None, list[str]]:
        where = f"customers: {path}"
        if size > MAX_FILE:
            return None, [f"{where}: {size} bytes: a customer file is at most {MAX_FILE} bytes"]
        try:
            data = tomllib.loads(path.read_bytes().decode("utf-8"))
        except OSError as e:
            return None, [f"{where}: cannot read: {e.strerror or e}"]
        except UnicodeDecodeError:
            return None, [f"{where}: the file is not UTF-8 text"]
        except tomllib.TOMLDecodeError as e:
            return None, [f"{where}: TOML syntax error: {e}"]
        return customer_from(
            data, self.settings.keys, f"files:{path}", where, default_name=path.stem
        )

    def commit(self, loaded: Loaded) -> None:
        self._seen = loaded.state

    def fallback(self) -> Loaded:
        raise SourceError(f"{self.describe()}: a directory has no snapshot")


def _ext(a: Customer | None, b: Customer) -> bool:
    """Customer compares without ext (other modules' settings): did those change?"""
    return a is not None and a.ext != b.ext


# --------------------------------------------------------------------------- postgresql


class PostgresSource:
    kind = "postgresql"

    def __init__(self, settings: CustomerSource, config: Config):
        self.settings = settings
        snap = settings.snapshot or str(
            Path(resolve_state_path(config.server.state, config.path)).with_name(
                "customers.snapshot.json"
            )
        )
        p = Path(snap)
        self.snapshot = p if p.is_absolute() else base_dir(config) / p
        self._tables: dict[str, dict[str, Any]] | None = None
        self._good: dict[str, Customer] = {}

    def describe(self) -> str:
        return f"postgresql {redact(self.settings.dsn)}"

    def load(self) -> Loaded:
        try:
            rows = _run_apart(self._fetch)
        except Exception as e:  # noqa: BLE001  asyncpg's errors, OSError, timeouts
            why = clean(e) or type(e).__name__
            raise SourceError(f"cannot query {self.describe()}: {why}") from None
        tables, problems = group_rows(rows, f"customers: {self.describe()}")
        return self._from_tables(tables, problems, f"postgresql:{redact(self.settings.dsn)}")

    async def _fetch(self) -> list[dict[str, Any]]:
        import asyncpg

        conn = await asyncpg.connect(self.settings.dsn, timeout=self.settings.connect_timeout)
        try:
            records = await conn.fetch(self.settings.query, timeout=60)
        finally:
            await conn.close()
        return [dict(r) for r in records]

    def fallback(self) -> Loaded:
        """The last good rows, from the on-disk snapshot."""
        try:
            doc = json.loads(self.snapshot.read_text())
            tables = {t["name"]: t for t in doc["tables"]}
            written = float(doc["written"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not a snapshot maild wrote"
            raise SourceError(f"no usable snapshot at {self.snapshot}: {why}") from None
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(written))
        loaded = self._from_tables(tables, [], f"postgresql-snapshot:{self.snapshot}")
        loaded.note += f" (from the snapshot of {when})"
        return loaded

    def _from_tables(
        self, tables: dict[str, dict[str, Any]], problems: list[str], origin: str
    ) -> Loaded:
        good: dict[str, Customer] = {}
        for name, t in tables.items():
            where = f"customers: {self.describe()}: customer {name}"
            c, errs = customer_from(t, self.settings.keys, origin, where)
            if c is not None:
                good[name] = c
                continue
            kept = self._good.get(name)
            tail = "; the version in force stays" if kept else "; not loaded"
            problems.extend(e + tail for e in errs)
            if kept is not None:
                good[name] = kept
        note = f"{self.describe()}: {len(good)} customers"
        broken = len(tables) - len(good)
        if broken:
            note += f", {broken} not loaded"
        return Loaded(
            tuple(good.values()),
            problems,
            note,
            tables != self._tables,
            (tables, good, not origin.startswith("postgresql-snapshot:")),
        )

    def commit(self, loaded: Loaded) -> None:
        tables, good, live = loaded.state
        if live and tables != self._tables:
            write_snapshot(self.snapshot, tables)
        self._tables, self._good = tables, good


def _run_apart(fn: Any) -> Any:
    """fn() on an event loop of its own: this thread's, or a new thread's when this one
    already runs a loop (a CLI command reading the source from inside its coroutine)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(fn())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(fn())).result()


def write_snapshot(path: Path, tables: dict[str, dict[str, Any]]) -> None:
    """Atomically, 0600: the file holds the provider's customer records."""
    doc = {"format": 1, "written": time.time(), "tables": list(tables.values())}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".customers.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def redact(dsn: str) -> str:
    """The DSN without its password: it goes into logs."""
    try:
        u = urlsplit(dsn)
        if u.password is None:
            return dsn
        netloc = u.netloc.rsplit("@", 1)[1]
        user = u.username or ""
        return urlunsplit(u._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "(unparsable dsn)"


def open_source(config: Config) -> FilesSource | PostgresSource | None:
    s = config.customer_source
    if s.type == "files":
        return FilesSource(s, config)
    if s.type == "postgresql":
        return PostgresSource(s, config)
    return None
