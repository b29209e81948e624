"""Quota where the mail store takes it from: Maildir++ maildirsize and a Dovecot userdb file.

maildirsize (Maildir++ quota, read by Dovecot, Courier and maildrop): line 1 is the
limit ("1048576S,1000C"), every further line "bytes count" is a delta, appended. maild
never edits it in place: it appends one negative line after deleting, and rewrites
line 1 through a temporary file and rename(2), keeping the file's owner and mode
(a maildirsize Dovecot cannot open for writing silently disables quota enforcement).

Dovecot takes a forced limit ("*:" quota_rule) from userdb, and then ignores and
rewrites line 1 of maildirsize. For those installations maild maintains a passwd-file
that Dovecot reads as a second userdb, one line per shrunk mailbox:
``user:::::::userdb_quota_rule=*:bytes=1048576``. Removing the line restores whatever
the operator's own userdb says, so a quota changed in the meantime is respected.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import subprocess
import time
from dataclasses import dataclass

from maild.retention.locks import file_lock

log = logging.getLogger("maild.retention")

MAILDIRSIZE = "maildirsize"
ORIGINAL = "maildirsize.maild-original"  # the limit before the first shrink, next to it
NO_FILE = "-"  # "there was no maildirsize" (never a valid line 1)
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Maildirsize:
    limit_line: str
    bytes_limit: int  # 0 = no limit
    count_limit: int  # 0 = no limit
    usage_bytes: int
    usage_count: int
    usage_lines: int


def parse_limit(line: str) -> tuple[int, int]:
    """'1048576S,1000C' into (bytes, count); 0 means no limit; unknown parts are ignored."""
    b = c = 0
    for part in line.strip().split(","):
        part = part.strip()
        if len(part) >= 2 and part[:-1].isdigit():
            if part[-1] == "S":
                b = int(part[:-1])
            elif part[-1] == "C":
                c = int(part[:-1])
    return b, c


def format_limit(bytes_limit: int, count_limit: int = 0) -> str:
    """Line 1 as Dovecot writes it ("0S" when there is no limit at all)."""
    parts = []
    if bytes_limit or not count_limit:
        parts.append(f"{bytes_limit}S")
    if count_limit:
        parts.append(f"{count_limit}C")
    return ",".join(parts)


def shrunk_line(original_line: str | None, quota: int) -> str:
    """The reduced limit; a message-count limit the mailbox had is kept."""
    _, count = parse_limit(original_line or "")
    return format_limit(quota, count)


def parse(text: str) -> Maildirsize | None:
    """None if there is no first line; usage sums every complete "bytes count" line."""
    lines = text.split("\n")
    if not text or lines[0] == "" and len(lines) == 1:
        return None
    complete = lines[1:-1] if not text.endswith("\n") else lines[1:]
    b = c = n = 0
    for line in complete:
        if not line.strip():
            continue
        fields = line.split()
        try:
            b += int(fields[0])
            c += int(fields[1])
        except (IndexError, ValueError):
            continue
        n += 1
    bl, cl = parse_limit(lines[0])
    return Maildirsize(lines[0], bl, cl, b, c, n)


# --------------------------------------------------------------------------- files


def read_text(root_fd: int, name: str) -> str | None:
    try:
        fd = os.open(name, os.O_RDONLY | _OPEN_FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink: not ours to read
            return None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(fd)


def read(root_fd: int) -> Maildirsize | None:
    text = read_text(root_fd, MAILDIRSIZE)
    return parse(text) if text is not None else None


def _stat(root_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def write_atomic(
    root_fd: int,
    name: str,
    data: bytes,
    *,
    like: os.stat_result | None = None,
    exclusive: bool = False,
) -> bool:
    """Write a file in the mailbox root through a temporary file and rename(2), owned like
    the file it replaces (or like the mailbox root, mode 0600). With exclusive, an existing
    file is kept and False returned."""
    if like is None:
        like = _stat(root_fd, name)
    owner = like if like is not None and stat.S_ISREG(like.st_mode) else os.fstat(root_fd)
    mode = stat.S_IMODE(owner.st_mode) & 0o666 if owner is like else 0o600
    tmp = f"{name}.maild-tmp.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600, dir_fd=root_fd)
    try:
        try:
            os.fchown(fd, owner.st_uid, owner.st_gid)
        except PermissionError:
            if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
                raise
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=root_fd)
        raise
    os.close(fd)
    try:
        if exclusive:
            try:
                os.link(tmp, name, src_dir_fd=root_fd, dst_dir_fd=root_fd, follow_symlinks=False)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp, dir_fd=root_fd)
        else:
            os.rename(tmp, name, src_dir_fd=root_fd, dst_dir_fd=root_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=root_fd)
        raise
    os.fsync(root_fd)
    return True


def set_limit(root_fd: int, line: str, usage: tuple[int, int]) -> str | None:
    """Make `line` the first line of maildirsize, keeping every delta line. A missing file is
    created with `usage` (bytes, count) as its only delta, as a recalculation would.
    Returns the previous line 1 (None if there was no file)."""
    text = read_text(root_fd, MAILDIRSIZE)
    if text is None:
        write_atomic(root_fd, MAILDIRSIZE, f"{line}\n{usage[0]} {usage[1]}\n".encode())
        return None
    first, _, rest = text.partition("\n")
    if first == line:
        return first
    if rest and not rest.endswith("\n"):
        rest = rest[: rest.rfind("\n") + 1]  # an unfinished append: drop it, as Dovecot does
    write_atomic(root_fd, MAILDIRSIZE, f"{line}\n{rest}".encode())
    return first


def remove(root_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(MAILDIRSIZE, dir_fd=root_fd)


def append_usage(root_fd: int, dbytes: int, dcount: int) -> bool:
    """Append one delta line (negative after deleting). False if there is no maildirsize."""
    if not dbytes and not dcount:
        return True
    try:
        fd = os.open(MAILDIRSIZE, os.O_WRONLY | os.O_APPEND | _OPEN_FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno == errno.ELOOP:
            return False
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        os.write(fd, f"{dbytes} {dcount}\n".encode())  # one write: atomic with O_APPEND
    finally:
        os.close(fd)
    return True


def recount(root_fd: int, usage: tuple[int, int]) -> bool:
    """Rewrite maildirsize as line 1 plus the counted usage (a Maildir++ recalculation)."""
    text = read_text(root_fd, MAILDIRSIZE)
    if text is None:
        return False
    first = text.partition("\n")[0]
    write_atomic(root_fd, MAILDIRSIZE, f"{first}\n{usage[0]} {usage[1]}\n".encode())
    return True


def read_original(root_fd: int) -> str | None:
    text = read_text(root_fd, ORIGINAL)
    if text is None or not text.endswith("\n"):
        return None
    return text[:-1]


def save_original(root_fd: int, line: str) -> str:
    """Keep the pre-shrink limit next to maildirsize, once: an existing record wins."""
    if not write_atomic(root_fd, ORIGINAL, f"{line}\n".encode(), exclusive=True):
        kept = read_original(root_fd)
        if kept is not None:
            return kept
    return line


def drop_original(root_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(ORIGINAL, dir_fd=root_fd)


# --------------------------------------------------------------------------- Dovecot userdb


class UserdbOverrides:
    """The passwd-file maild keeps for Dovecot: forced quota rules of shrunk mailboxes."""

    HEADER = (
        "# Maintained by maild (retention): quota of idle root mailboxes. Do not edit.\n"
        "# Dovecot reads it as a second userdb; see docs/retention.md.\n"
    )

    def __init__(self, path: str, lock_timeout: float = 30.0):
        self.path = path
        self.lock_timeout = lock_timeout

    def read(self) -> dict[str, str]:
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return {}
        out = {}
        for line in lines:
            if not line or line.startswith("#"):
                continue
            fields = line.split(":", 7)
            if len(fields) == 8:
                out[fields[0]] = fields[7]
        return out

    def limit(self, user: str) -> int | None:
        extra = self.read().get(user, "")
        for field in extra.split():
            if field.startswith("userdb_quota_rule=*:bytes="):
                return int(field.rsplit("=", 1)[1])
        return None

    def set(self, user: str, bytes_limit: int) -> bool:
        return self._change(user, f"userdb_quota_rule=*:bytes={bytes_limit}")

    def remove(self, user: str) -> bool:
        return self._change(user, None)

    def ensure(self) -> None:
        """Create the (empty) file, so Dovecot never looks up a missing one."""
        if not os.path.exists(self.path):
            self._change("", None, force=True)

    def _change(self, user: str, extra: str | None, force: bool = False) -> bool:
        if user and (":" in user or not user.strip() or "\n" in user):
            raise ValueError(f"user name unusable in a passwd-file: {user!r}")
        with file_lock(self.path, self.lock_timeout):
            entries = self.read()
            if user:
                if extra is None:
                    if user not in entries and not force:
                        return False
                    entries.pop(user, None)
                else:
                    if entries.get(user) == extra:
                        return False
                    entries[user] = extra
            self._write(entries)
        return True

    def _write(self, entries: dict[str, str]) -> None:
        d = os.path.dirname(self.path) or "."
        os.makedirs(d, mode=0o755, exist_ok=True)
        body = self.HEADER + "".join(f"{u}:::::::{x}\n" for u, x in sorted(entries.items()))
        try:
            old = os.stat(self.path)
        except FileNotFoundError:
            old = None
        tmp = f"{self.path}.maild-tmp.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o644)
        try:
            if old is not None:
                os.fchown(fd, old.st_uid, old.st_gid)
                os.fchmod(fd, stat.S_IMODE(old.st_mode))
            os.write(fd, body.encode("utf-8"))
            os.fsync(fd)
            # Dovecot re-reads a passwd-file when its mtime (seconds) or size changed: make
            # every version's mtime strictly later than the last one's.
            now = time.time()
            mtime = max(int(now), int(old.st_mtime) + 1) if old is not None else now
            os.utime(fd, (now, mtime))
        finally:
            os.close(fd)
        os.rename(tmp, self.path)


def run_doveadm(doveadm: tuple[str, ...], *args: str, timeout: float = 30.0) -> bool:
    """Run a doveadm command; a failure is logged, never raised (the file change stands)."""
    argv = [*doveadm, *args]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("retention: doveadm failed command=%r error=%s", " ".join(argv), e)
        return False
    if p.returncode != 0:
        log.error(
            "retention: doveadm failed command=%r status=%d error=%s",
            " ".join(argv),
            p.returncode,
            (p.stderr or p.stdout).strip().replace("\n", " ")[:300],
        )
        return False
    return True
