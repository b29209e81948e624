"""When each mailbox was last accessed by POP or IMAP, as maild records it.

Sources, all merged with "the later time wins":
- the Dovecot log, followed from a file (with rotation and truncation handled, position
  kept in the store so a restart reads on from where it stopped) or from the journal
  (cursor kept); Dovecot 2.3 "Login:", 2.4 "Logged in:", imap and pop3; Courier's
  "LOGIN, user=" lines too;
- Dovecot's last_login plugin dict (file driver: key and value lines);
- `maild access touch USER`.

atime and index mtimes are never used: deliveries and the purge itself change them.
Only successful imap and pop3 logins count (not submission, sieve, lmtp or lda).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from maild.retention import state
from maild.retention.config import AccessSettings
from maild.retention.mailboxes import normalize_user, safe_user
from maild.store.base import Store, StoreError

log = logging.getLogger("maild.retention")

_DOVECOT = re.compile(r"\b(imap|pop3)-login: (?:[A-Za-z]+: )?(?:Login|Logged in): user=<([^>]*)>")
_COURIER = re.compile(r"\b(imapd|pop3d)(?:-ssl)?(?:\[\d+\])?: LOGIN, user=([^,\s]+),")
_ISO = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?)\s")
_BSD = re.compile(r"^([A-Z][a-z]{2}) +(\d{1,2}) (\d\d):(\d\d):(\d\d)(?:\.\d+)?\s")
_MONTHS = {m: i for i, m in enumerate(calendar.month_abbr) if m}
MAX_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Login:
    user: str
    ts: float
    source: str  # "imap" | "pop3" (Courier's imapd/pop3d are reported the same way)


def parse_timestamp(line: str, now: float) -> float | None:
    """The time at the start of a log line (ISO 8601 or syslog "Nov 22 12:42:50"), or None."""
    m = _ISO.match(line)
    if m:
        from datetime import datetime

        text = m.group(1).replace("Z", "+00:00")
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            return None
        return dt.timestamp()
    m = _BSD.match(line)
    if not m:
        return None
    month = _MONTHS.get(m.group(1))
    if month is None:
        return None
    year = time.localtime(now).tm_year
    for y in (year, year - 1):
        try:
            ts = time.mktime(
                (
                    y,
                    month,
                    int(m.group(2)),
                    int(m.group(3)),
                    int(m.group(4)),
                    int(m.group(5)),
                    0,
                    0,
                    -1,
                )
            )
        except (OverflowError, ValueError):
            return None
        if ts <= now + 86400:  # a line from "December" read in January is last year's
            return ts
    return None


def parse_line(line: str, now: float) -> Login | None:
    """A successful POP/IMAP login in one log line, or None.

    The time is the line's own timestamp (never later than now), else now: reading a
    backlog late never makes a login look older than it was."""
    m = _DOVECOT.search(line)
    if m:
        proto, user = m.group(1), m.group(2)
    else:
        m = _COURIER.search(line)
        if not m:
            return None
        proto, user = ("imap" if m.group(1) == "imapd" else "pop3"), m.group(2)
    user = normalize_user(user)
    if not user or not safe_user(user):
        return None
    ts = parse_timestamp(line, now)
    if ts is None or ts > now:
        ts = now
    return Login(user, ts, proto)


def parse_lines(lines: Iterable[str], now: float) -> list[Login]:
    out = []
    for line in lines:
        login = parse_line(line, now)
        if login is not None:
            out.append(login)
    return out


def latest(logins: Iterable[Login]) -> list[tuple[str, float, str]]:
    """One (user, time, source) per user: the latest login."""
    best: dict[str, Login] = {}
    for lg in logins:
        cur = best.get(lg.user)
        if cur is None or lg.ts > cur.ts:
            best[lg.user] = lg
    return [(lg.user, lg.ts, lg.source) for lg in best.values()]


# --------------------------------------------------------------------------- last_login dict


def _tab_unescape(s: str) -> str:
    if "\x01" not in s:
        return s
    out, i = [], 0
    table = {"0": "\x00", "1": "\x01", "t": "\t", "r": "\r", "n": "\n"}
    while i < len(s):
        if s[i] == "\x01" and i + 1 < len(s):
            out.append(table.get(s[i + 1], s[i + 1]))
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _epoch(value: str) -> float | None:
    """last_login_precision may be s, ms, us or ns: tell them apart by magnitude."""
    try:
        v = int(value.strip())
    except ValueError:
        return None
    if v <= 0:
        return None
    for scale in (1, 1_000, 1_000_000, 1_000_000_000):
        if v / scale < 10_000_000_000:  # before the year 2286
            return v / scale
    return None


def parse_dict_file(text: str, prefix: str, now: float) -> list[tuple[str, float, str]]:
    """Dovecot's file dict: a key line, then a value line, tab-escaped."""
    lines = text.split("\n")
    out = []
    for i in range(0, len(lines) - 1, 2):
        key, value = _tab_unescape(lines[i]), _tab_unescape(lines[i + 1])
        if not key.startswith(prefix):
            continue
        user = normalize_user(key[len(prefix) :])
        ts = _epoch(value)
        if user and safe_user(user) and ts is not None:
            out.append((user, min(ts, now), "last_login"))
    return out


def parse_tsv(text: str, now: float) -> list[tuple[str, float, str]]:
    """'user<whitespace>unix-time' per line, for exports from other dict backends."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or line.startswith("#"):
            continue
        user, ts = normalize_user(fields[0]), _epoch(fields[1])
        if user and safe_user(user) and ts is not None:
            out.append((user, min(ts, now), "import"))
    return out


# --------------------------------------------------------------------------- following

OnAccess = Callable[[list[tuple[str, float, str]]], Awaitable[None]]


class FileFollower:
    """Reads new complete lines of a log file from the position kept in the store.

    A rotated file (new inode) is finished from the old position if it can still be
    found as PATH.1 or PATH-*, then the new file is read from its start; a truncated
    file (copytruncate) is read from its start.
    """

    def __init__(self, path: str, store: Store, clock: Callable[[], float] = time.time):
        self.path = path
        self.source = f"file:{path}"
        self.store = store
        self.clock = clock

    async def poll(self, on_access: OnAccess) -> int:
        """Read everything new now; returns the number of logins seen."""
        pos = await state.log_position(self.store, self.source)
        inode, offset = (pos[0], pos[1]) if pos else (0, 0)
        total = 0
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return 0
        if inode and st.st_ino != inode:
            old = _find_rotated(self.path, inode)
            if old is not None:
                total += await self._drain(old, inode, offset, on_access, final=True)
            inode, offset = st.st_ino, 0
        elif not inode:
            inode = st.st_ino
        if st.st_size < offset:
            log.info("retention: access log truncated path=%s, reading from the start", self.path)
            offset = 0
        total += await self._drain(self.path, inode, offset, on_access)
        return total

    async def _drain(
        self, path: str, inode: int, offset: int, on_access: OnAccess, final: bool = False
    ) -> int:
        total = 0
        while True:
            lines, new_offset, ino = await asyncio.to_thread(_read_chunk, path, offset)
            if ino != inode:
                return total  # replaced while we looked: next poll sorts it out
            if lines:
                logins = parse_lines(lines, self.clock())
                if logins:
                    await on_access(latest(logins))
                    total += len(logins)
            if new_offset == offset:
                break
            offset = new_offset
            if not final:
                await state.save_log_position(
                    self.store, self.source, inode=inode, offset=offset, now=self.clock()
                )
        if final:
            return total
        await state.save_log_position(
            self.store, self.source, inode=inode, offset=offset, now=self.clock()
        )
        return total


def _find_rotated(path: str, inode: int) -> str | None:
    d, base = os.path.split(path)
    try:
        names = os.listdir(d or ".")
    except OSError:
        return None
    for name in names:
        if name == base + ".1" or (
            name.startswith(base + "-") and not name.endswith((".gz", ".xz", ".bz2", ".zst"))
        ):
            p = os.path.join(d, name)
            with contextlib.suppress(OSError):
                if os.stat(p).st_ino == inode:
                    return p
    return None


def _read_chunk(path: str, offset: int) -> tuple[list[str], int, int]:
    """Complete lines from offset (at most MAX_CHUNK bytes); an unfinished last line waits."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return [], offset, 0
    try:
        ino = os.fstat(fd).st_ino
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, MAX_CHUNK)
    finally:
        os.close(fd)
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset, ino
    chunk = data[: end + 1]
    return chunk.decode("utf-8", "replace").splitlines(), offset + len(chunk), ino


class JournalFollower:
    """Follows the journal with journalctl (JSON output), keeping the cursor in the store."""

    source = "journal"

    def __init__(
        self, matches: Sequence[str], store: Store, clock: Callable[[], float] = time.time
    ):
        self.matches = tuple(matches)
        self.store = store
        self.clock = clock
        self.since: float | None = None  # after a cursor the journal no longer knows

    def argv(self, cursor: str, follow: bool) -> list[str]:
        args = ["journalctl", "--output=json", "--no-pager"]
        if follow:
            args.append("--follow")
        if cursor:
            args.append(f"--after-cursor={cursor}")
        elif self.since is not None:
            args += [f"--since=@{int(self.since)}", "--lines=all"]
        else:
            args.append("--lines=all")
        return args + list(self.matches)

    def parse_entry(self, raw: str) -> tuple[Login | None, str]:
        try:
            entry = json.loads(raw)
        except ValueError:
            return None, ""
        msg = entry.get("MESSAGE")
        if isinstance(msg, list):  # non-UTF-8 messages come as a list of bytes
            msg = bytes(msg).decode("utf-8", "replace")
        cursor = entry.get("__CURSOR", "")
        if not isinstance(msg, str):
            return None, cursor
        now = self.clock()
        login = parse_line(msg, now)
        if login is not None:
            try:
                ts = int(entry.get("__REALTIME_TIMESTAMP", "0")) / 1e6
            except (TypeError, ValueError):
                ts = 0
            if 0 < ts <= now:
                login = Login(login.user, ts, login.source)
        return login, cursor

    async def run(self, on_access: OnAccess, *, follow: bool = True) -> int:
        pos = await state.log_position(self.store, self.source)
        cursor = pos[2] if pos else ""
        if self.since is not None:
            cursor = ""
        start_cursor = cursor
        proc = await asyncio.create_subprocess_exec(
            *self.argv(cursor, follow),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        total = 0
        batch: list[Login] = []
        saved = cursor
        try:
            while True:
                try:
                    raw: bytes | None = await asyncio.wait_for(proc.stdout.readline(), 0.5)
                except TimeoutError:
                    raw = None  # quiet: flush what we have
                if raw:
                    login, c = self.parse_entry(raw.decode("utf-8", "replace"))
                    cursor = c or cursor
                    if login is not None:
                        batch.append(login)
                    if len(batch) < 500:
                        continue
                if batch:
                    await on_access(latest(batch))
                    total += len(batch)
                    batch = []
                if cursor != saved:
                    await state.save_log_position(
                        self.store, self.source, cursor=cursor, now=self.clock()
                    )
                    saved = cursor
                if raw == b"":
                    break
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
        if proc.returncode and start_cursor and cursor == start_cursor:
            # e.g. "Failed to seek to cursor" after the journal was rotated away or reset:
            # read on from a little before the last time a position was saved
            self.since = (await _position_time(self.store, self.source) or self.clock()) - 300
            log.warning("retention: journal cursor not usable, reading since %d", int(self.since))
        elif cursor != start_cursor:
            self.since = None
        return total


async def _position_time(store: Store, source: str) -> float | None:
    for src, _ino, _off, _cur, updated in await state.log_positions(store):
        if src == source:
            return updated
    return None


async def import_dict(
    path: str, prefix: str, on_access: OnAccess, clock: Callable[[], float] = time.time
) -> int:
    """Import Dovecot's last_login file dict; returns the number of users in it."""

    def _read() -> str | None:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return None

    text = await asyncio.to_thread(_read)
    if text is None:
        return 0
    rows = parse_dict_file(text, prefix, clock())
    if rows:
        await on_access(rows)
    return len(rows)


class AccessTracker:
    """Follows the configured sources until stopped; calls on_access with every batch."""

    def __init__(
        self,
        settings: AccessSettings,
        store: Store,
        on_access: OnAccess,
        *,
        resolve: Callable[[str], str] = lambda p: p,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.store = store
        self.on_access = on_access
        self.resolve = resolve
        self.clock = clock
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        if s.dovecot_log == "journal":
            self.tasks.append(loop.create_task(self._journal(), name="maild-retention-journal"))
        elif s.dovecot_log:
            self.tasks.append(loop.create_task(self._file(), name="maild-retention-log"))
        if s.last_login_dict:
            self.tasks.append(loop.create_task(self._dict(), name="maild-retention-lastlogin"))

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.tasks = []

    async def _file(self) -> None:
        follower = FileFollower(self.resolve(self.settings.dovecot_log), self.store, self.clock)
        while True:
            try:
                await follower.poll(self.on_access)
            except (OSError, StoreError) as e:
                log.error("retention: access log path=%s error=%s", follower.path, e)
            await asyncio.sleep(self.settings.poll_interval)

    async def _journal(self) -> None:
        follower = JournalFollower(self.settings.journal_match, self.store, self.clock)
        while True:
            try:
                await follower.run(self.on_access)
            except (OSError, StoreError) as e:
                log.error("retention: journal error=%s", e)
            await asyncio.sleep(max(self.settings.poll_interval, 5.0))

    async def _dict(self) -> None:
        path = self.resolve(self.settings.last_login_dict)
        while True:
            try:
                await import_dict(
                    path, self.settings.last_login_key_prefix, self.on_access, self.clock
                )
            except (OSError, StoreError) as e:
                log.error("retention: last_login dict path=%s error=%s", path, e)
            await asyncio.sleep(self.settings.import_interval)
