"""What retention remembers in maild's store, and the queries on it.

One row per mailbox (first seen, last POP/IMAP access, quota state and the original
quota recorded once), one row per deleted file (the audit trail), one row per run, a
per-directory summary that lets a run skip directories that have not changed, and the
position reached in the Dovecot log. Every query works on whole batches: a run never
makes a database round trip per file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from maild.store.base import Store

# The retention schema, in order (maild.components hands it to the store).
MIGRATIONS = (
    """
    CREATE TABLE retention_mailboxes (
        user TEXT PRIMARY KEY,
        first_seen REAL NOT NULL,
        last_access REAL,
        access_source TEXT NOT NULL DEFAULT '',
        quota_state TEXT NOT NULL DEFAULT 'normal',
        original_quota TEXT,
        shrunk_quota TEXT,
        shrunk_at REAL,
        shrunk_rule TEXT,
        shrunk_idle_since REAL,
        restored_at REAL,
        restored_quota TEXT
    );
    CREATE TABLE retention_deletions (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL,
        ts REAL NOT NULL,
        rule TEXT NOT NULL,
        user TEXT NOT NULL,
        folder TEXT NOT NULL,
        name TEXT NOT NULL,
        size INTEGER NOT NULL,
        status TEXT NOT NULL
    );
    CREATE INDEX retention_deletions_user_ts ON retention_deletions(user, ts);
    CREATE INDEX retention_deletions_ts ON retention_deletions(ts);
    CREATE INDEX retention_deletions_pending ON retention_deletions(run_id, user)
        WHERE status = 'pending';
    CREATE TABLE retention_runs (
        id INTEGER PRIMARY KEY,
        rule TEXT NOT NULL,
        started REAL NOT NULL,
        finished REAL,
        status TEXT NOT NULL,
        trigger TEXT NOT NULL DEFAULT '',
        mailboxes INTEGER NOT NULL DEFAULT 0,
        scanned INTEGER NOT NULL DEFAULT 0,
        deleted INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0,
        vanished INTEGER NOT NULL DEFAULT 0,
        skipped INTEGER NOT NULL DEFAULT 0,
        shrunk INTEGER NOT NULL DEFAULT 0,
        restored INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX retention_runs_rule ON retention_runs(rule, started);
    CREATE TABLE retention_dircache (
        path TEXT PRIMARY KEY,
        dev INTEGER NOT NULL,
        ino INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL,
        count INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        min_mtime REAL NOT NULL,
        min_ctime REAL NOT NULL
    );
    CREATE TABLE retention_log_position (
        source TEXT PRIMARY KEY,
        inode INTEGER NOT NULL DEFAULT 0,
        offset INTEGER NOT NULL DEFAULT 0,
        cursor TEXT NOT NULL DEFAULT '',
        updated REAL NOT NULL
    );
    """,
)


@dataclass(frozen=True, slots=True)
class MailboxRow:
    user: str
    first_seen: float
    last_access: float | None
    access_source: str
    quota_state: str
    original_quota: str | None
    shrunk_quota: str | None
    shrunk_at: float | None
    shrunk_rule: str | None
    shrunk_idle_since: float | None
    restored_at: float | None
    restored_quota: str | None = None

    @property
    def idle_since(self) -> float:
        """The idle clock starts at the last access, or when maild first saw the mailbox."""
        return max(self.first_seen, self.last_access or 0.0)


_MB_COLS = (
    "user, first_seen, last_access, access_source, quota_state, original_quota, "
    "shrunk_quota, shrunk_at, shrunk_rule, shrunk_idle_since, restored_at, restored_quota"
)


# --------------------------------------------------------------------------- mailboxes


async def mailboxes(store: Store, users: Sequence[str] | None = None) -> dict[str, MailboxRow]:
    """All known mailboxes (one query), or only the given users."""
    if users is None:
        rows = await store.fetchall(f"SELECT {_MB_COLS} FROM retention_mailboxes")
    else:
        rows = []
        users = list(users)
        for i in range(0, len(users), 500):
            chunk = users[i : i + 500]
            rows += await store.fetchall(
                f"SELECT {_MB_COLS} FROM retention_mailboxes WHERE user IN "
                f"({','.join('?' * len(chunk))})",
                chunk,
            )
    return {r[0]: MailboxRow(*r) for r in rows}


async def mailbox(store: Store, user: str) -> MailboxRow | None:
    row = await store.fetchone(
        f"SELECT {_MB_COLS} FROM retention_mailboxes WHERE user = ?", (user,)
    )
    return MailboxRow(*row) if row else None


async def first_seen(store: Store, users: Iterable[str], now: float) -> None:
    """Start the idle clock of mailboxes maild has not seen before (never 'never accessed')."""
    await store.executemany(
        "INSERT INTO retention_mailboxes(user, first_seen) VALUES (?, ?) ON CONFLICT(user) DO NOTHING",
        [(u, now) for u in users],
    )


async def record_access(store: Store, accesses: Iterable[tuple[str, float, str]]) -> None:
    """Record POP/IMAP accesses (user, time, source); a later time always wins."""
    await store.executemany(
        """
        INSERT INTO retention_mailboxes(user, first_seen, last_access, access_source)
        VALUES (?1, ?2, ?2, ?3)
        ON CONFLICT(user) DO UPDATE SET
            access_source = CASE WHEN excluded.last_access > coalesce(retention_mailboxes.last_access, 0)
                                 THEN excluded.access_source ELSE retention_mailboxes.access_source END,
            last_access = CASE WHEN excluded.last_access > coalesce(retention_mailboxes.last_access, 0)
                               THEN excluded.last_access
                               ELSE coalesce(retention_mailboxes.last_access, 0) END
        """,
        [(u, t, s) for u, t, s in accesses],
    )


async def record_original_quota(store: Store, user: str, original: str) -> str:
    """Record the quota before the first shrink; never overwrite it. Returns the recorded one."""
    await store.execute(
        "UPDATE retention_mailboxes SET original_quota = ? WHERE user = ? AND original_quota IS NULL",
        (original, user),
    )
    row = await store.fetchone(
        "SELECT original_quota FROM retention_mailboxes WHERE user = ?", (user,)
    )
    return row[0] if row and row[0] is not None else original


async def mark_shrunk(
    store: Store, user: str, *, state: str, quota: str, rule: str, at: float, idle_since: float
) -> None:
    await store.execute(
        "UPDATE retention_mailboxes SET quota_state = ?, shrunk_quota = ?, shrunk_rule = ?, "
        "shrunk_at = coalesce(shrunk_at, ?), shrunk_idle_since = ? WHERE user = ?",
        (state, quota, rule, at, idle_since, user),
    )


async def mark_restored(store: Store, user: str, at: float, restored: str | None) -> None:
    """The original is restored: forget it, so a later shrink records the then-current one.
    What was restored (and the shrunk limit) stay, to check the restore held."""
    await store.execute(
        "UPDATE retention_mailboxes SET quota_state = 'normal', original_quota = NULL, "
        "shrunk_at = NULL, shrunk_rule = NULL, shrunk_idle_since = NULL, "
        "restored_at = ?, restored_quota = ? WHERE user = ?",
        (at, restored, user),
    )


async def recently_restored(store: Store, since: float) -> list[MailboxRow]:
    rows = await store.fetchall(
        f"SELECT {_MB_COLS} FROM retention_mailboxes WHERE quota_state = 'normal' AND "
        "restored_at >= ? AND restored_quota IS NOT NULL AND shrunk_quota IS NOT NULL",
        (since,),
    )
    return [MailboxRow(*r) for r in rows]


async def shrunk_mailboxes(store: Store) -> dict[str, MailboxRow]:
    rows = await store.fetchall(
        f"SELECT {_MB_COLS} FROM retention_mailboxes WHERE quota_state != 'normal'"
    )
    return {r[0]: MailboxRow(*r) for r in rows}


# --------------------------------------------------------------------------- deletions


async def add_pending(
    store: Store, rows: Sequence[tuple[int, float, str, str, str, str, int]]
) -> None:
    """Write-ahead: (run_id, ts, rule, user, folder, name, size) before the files are unlinked."""
    await store.executemany(
        "INSERT INTO retention_deletions(run_id, ts, rule, user, folder, name, size, status) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending')",
        rows,
    )


async def claim(
    store: Store,
    user: str,
    idle: float | None,
    now: float,
    rows: Sequence[tuple[int, float, str, str, str, str, int]],
) -> tuple[MailboxRow | None, bool]:
    """In one trip: re-read the mailbox's last access and, if it is still idle (or the rule
    has no idle condition), write the planned deletions as pending. Returns (row, go)."""
    fresh = await mailbox(store, user)
    if idle is not None and fresh is not None and not now - fresh.idle_since > idle:
        return fresh, False
    if rows:
        await add_pending(store, rows)
    return fresh, True


async def settle(
    store: Store,
    run_id: int,
    user: str,
    outcomes: Sequence[tuple[str, str, str]],
    *,
    rest: str | None = None,
) -> None:
    """Set the final status of pending rows: (status, folder, name). With rest, every
    outcome not listed as `rest` is set one by one and all other pending rows of this run
    and user get `rest` in one statement (the common case: everything deleted)."""
    one_by_one = [
        (st, run_id, user, folder, name)
        for st, folder, name in outcomes
        if rest is None or st != rest
    ]
    if one_by_one:
        await store.executemany(
            "UPDATE retention_deletions SET status = ? WHERE run_id = ? AND user = ? AND "
            "folder = ? AND name = ? AND status = 'pending'",
            one_by_one,
        )
    if rest is not None:
        await store.execute(
            "UPDATE retention_deletions SET status = ? WHERE run_id = ? AND user = ? AND "
            "status = 'pending'",
            (rest, run_id, user),
        )


async def pending(store: Store) -> dict[str, list[tuple[int, str, str, int]]]:
    """Rows an interrupted run left pending, by user: (run_id, folder, name, size)."""
    rows = await store.fetchall(
        "SELECT user, run_id, folder, name, size FROM retention_deletions WHERE status = 'pending'"
    )
    out: dict[str, list[tuple[int, str, str, int]]] = {}
    for user, run_id, folder, name, size in rows:
        out.setdefault(user, []).append((run_id, folder, name, size))
    return out


async def deletions(
    store: Store,
    *,
    user: str | None = None,
    rule: str | None = None,
    since: float | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    where = ["status != 'pending'"]
    params: list[str | float] = []
    for col, val in (("user", user), ("rule", rule)):
        if val:
            where.append(f"{col} = ?")
            params.append(val)
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    params.append(limit)
    rows = await store.fetchall(
        "SELECT ts, run_id, rule, user, folder, name, size, status FROM retention_deletions "
        f"WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
        params,
    )
    cols = ("ts", "run_id", "rule", "user", "folder", "name", "size", "status")
    return [dict(zip(cols, r, strict=True)) for r in rows]


async def prune(store: Store, before: float) -> int:
    return await store.execute(
        "DELETE FROM retention_deletions WHERE ts < ? AND status != 'pending'", (before,)
    )


# --------------------------------------------------------------------------- runs

RUN_FIELDS = (
    "mailboxes",
    "scanned",
    "deleted",
    "bytes",
    "vanished",
    "skipped",
    "shrunk",
    "restored",
    "errors",
)


async def start_run(store: Store, rule: str, started: float, trigger: str) -> int:
    # A run left 'running' by a crash is over: the caller holds the rule's run lock.
    await store.execute(
        "UPDATE retention_runs SET status = 'interrupted' WHERE rule = ? AND status = 'running'",
        (rule,),
    )
    await store.execute(
        "INSERT INTO retention_runs(rule, started, status, trigger) VALUES (?, ?, 'running', ?)",
        (rule, started, trigger),
    )
    row = await store.fetchone("SELECT max(id) FROM retention_runs WHERE rule = ?", (rule,))
    assert row is not None
    return int(row[0])


async def finish_run(
    store: Store, run_id: int, finished: float, status: str, figures: dict[str, int]
) -> None:
    sets = ", ".join(f"{f} = ?" for f in RUN_FIELDS)
    await store.execute(
        f"UPDATE retention_runs SET finished = ?, status = ?, {sets} WHERE id = ?",
        (finished, status, *(figures.get(f, 0) for f in RUN_FIELDS), run_id),
    )


async def last_runs(store: Store) -> dict[str, dict[str, Any]]:
    """The latest run of every rule."""
    cols = ("id", "rule", "started", "finished", "status", "trigger") + RUN_FIELDS
    rows = await store.fetchall(
        f"SELECT {', '.join(cols)} FROM retention_runs WHERE id IN "
        "(SELECT max(id) FROM retention_runs GROUP BY rule)"
    )
    return {r[1]: dict(zip(cols, r, strict=True)) for r in rows}


async def last_completed_start(store: Store, rule: str) -> float | None:
    row = await store.fetchone(
        "SELECT max(started) FROM retention_runs WHERE rule = ? AND status = 'done'", (rule,)
    )
    return row[0] if row else None


# --------------------------------------------------------------------------- dir cache


async def dircache(store: Store) -> dict[str, tuple]:
    rows = await store.fetchall(
        "SELECT path, dev, ino, mtime_ns, ctime_ns, count, bytes, min_mtime, min_ctime "
        "FROM retention_dircache"
    )
    return {r[0]: tuple(r[1:]) for r in rows}


async def save_dircache(store: Store, entries: Iterable[tuple]) -> None:
    """entries: (path, dev, ino, mtime_ns, ctime_ns, count, bytes, min_mtime, min_ctime)."""
    await store.executemany(
        "INSERT INTO retention_dircache(path, dev, ino, mtime_ns, ctime_ns, count, bytes, "
        "min_mtime, min_ctime) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET "
        "dev = excluded.dev, ino = excluded.ino, mtime_ns = excluded.mtime_ns, "
        "ctime_ns = excluded.ctime_ns, count = excluded.count, bytes = excluded.bytes, "
        "min_mtime = excluded.min_mtime, min_ctime = excluded.min_ctime",
        list(entries),
    )


# --------------------------------------------------------------------------- log position


async def log_position(store: Store, source: str) -> tuple[int, int, str] | None:
    row = await store.fetchone(
        "SELECT inode, offset, cursor FROM retention_log_position WHERE source = ?", (source,)
    )
    return (int(row[0]), int(row[1]), str(row[2])) if row else None


async def save_log_position(
    store: Store, source: str, *, inode: int = 0, offset: int = 0, cursor: str = "", now: float
) -> None:
    await store.execute(
        "INSERT INTO retention_log_position(source, inode, offset, cursor, updated) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT(source) DO UPDATE SET inode = excluded.inode, "
        "offset = excluded.offset, cursor = excluded.cursor, updated = excluded.updated",
        (source, inode, offset, cursor, now),
    )


async def log_positions(store: Store) -> list[tuple[str, int, int, str, float]]:
    return list(
        await store.fetchall(
            "SELECT source, inode, offset, cursor, updated FROM retention_log_position"
        )
    )
