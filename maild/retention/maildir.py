"""Reading and deleting Maildir messages without ever leaving the mailbox.

Everything below a mailbox root is reached through directory file descriptors opened
with O_NOFOLLOW, so a symlink planted in a mailbox (a folder, cur/, or a message) is
never followed. Only regular files in cur/ and new/ are messages; tmp/ and dot-files
are never touched. A message is unlinked only if the name still refers to the inode
that was scanned: a file renamed by a flag change in between simply "vanished", which
is not an error (the next run sees it under its new name).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from maild.retention import mutf7

SUBDIRS = ("new", "cur")
NO_TIME = 1e18  # min time of an empty directory (later than any message)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Folder:
    name: str  # decoded, "/"-separated; "INBOX" for the mailbox root
    rel: tuple[str, ...]  # on-disk path components below the mailbox root


class MsgFile(NamedTuple):
    folder: str
    sub: str  # "cur" or "new"
    name: str
    size: int  # as the quota counts it: ",S=" from the name, else st_size
    mtime: float  # received date
    ctime: float  # saved date (time in this folder)
    ino: int


class DirSummary(NamedTuple):
    """What a run remembers about one cur/ or new/ directory between runs."""

    dev: int
    ino: int
    mtime_ns: int
    ctime_ns: int
    messages: int  # column "count" of retention_dircache (a field `count` would shadow tuple.count)
    bytes: int
    min_mtime: float
    min_ctime: float

    def same_dir(self, st: os.stat_result) -> bool:
        """Unchanged: no file was added, removed or renamed since it was summarised."""
        return (self.dev, self.ino, self.mtime_ns, self.ctime_ns) == (
            st.st_dev,
            st.st_ino,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )


# --------------------------------------------------------------------------- opening


def open_root(path: str) -> int:
    """Open a mailbox root. The configured path itself may be a symlink (the operator's
    layout); nothing below it is followed."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_dir(parent_fd: int, name: str) -> int:
    if not name or "/" in name or name in (".", ".."):
        raise OSError(errno.EINVAL, "not a single path component", name)
    return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)


def open_folder(root_fd: int, folder: Folder) -> int:
    """A new descriptor for the folder's directory (the caller closes it)."""
    fd = os.dup(root_fd)
    try:
        for part in folder.rel:
            nfd = open_dir(fd, part)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_dir(parent_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _is_maildir(parent_fd: int, name: str | None = None) -> bool:
    if name is None:
        return any(_is_dir(parent_fd, s) for s in SUBDIRS)
    try:
        fd = open_dir(parent_fd, name)
    except OSError:
        return False
    try:
        return any(_is_dir(fd, s) for s in SUBDIRS)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- folders


def folder_name(parts: list[str]) -> str:
    return "/".join(mutf7.decode(p) for p in parts)


def list_folders(
    root_fd: int, layout: str, want: Callable[[str], bool] | None = None
) -> list[Folder]:
    """The folders of one mailbox: INBOX (the root) and the rest, by layout.

    Maildir++: ".Sent", ".Archive.2024" (hierarchy with "."). LAYOUT=fs: "Sent",
    "Archive/2024" as directories. Names are decoded from modified UTF-7.

    With `want`, only the folders whose (decoded) name it accepts are returned, and only
    those are checked for being a maildir (an open and a stat or two each): a rule for
    Trash need not check every other folder of every mailbox.
    """
    folders: list[Folder] = []
    if (want is None or want("INBOX")) and _is_maildir(root_fd):
        folders.append(Folder("INBOX", ()))
    if layout == "fs":
        _walk_fs(root_fd, (), folders, 0)
        return folders if want is None else [f for f in folders if want(f.name)]
    with os.scandir(root_fd) as it:
        entries = sorted(
            e.name
            for e in it
            if e.name.startswith(".")
            and e.name not in (".", "..")
            and e.is_dir(follow_symlinks=False)
        )
    for name in entries:
        parts = name[1:].split(".")
        if not all(parts):
            continue
        decoded = folder_name(parts)
        if (want is None or want(decoded)) and _is_maildir(root_fd, name):
            folders.append(Folder(decoded, (name,)))
    return folders


def _walk_fs(fd: int, rel: tuple[str, ...], out: list[Folder], depth: int) -> None:
    if depth >= _MAX_DEPTH:
        return
    with os.scandir(fd) as it:
        names = sorted(
            e.name
            for e in it
            if not e.name.startswith(".")
            and e.name not in ("cur", "new", "tmp")
            and e.is_dir(follow_symlinks=False)
        )
    for name in names:
        try:
            sub = open_dir(fd, name)
        except OSError:
            continue
        try:
            path = rel + (name,)
            if _is_maildir(sub):
                out.append(Folder(folder_name(list(path)), path))
            _walk_fs(sub, path, out, depth + 1)
        finally:
            os.close(sub)


# --------------------------------------------------------------------------- scanning

_S_SIZE = re.compile(r",S=(\d+)(?=[:,]|$)")
_S_IFMT = 0o170000  # stat.S_IFMT(mode) is mode & this


def message_size(name: str, st_size: int) -> int:
    """The size the Maildir++ quota counts: ",S=<n>" in the file name, else the file size."""
    if ",S=" not in name:
        return st_size
    m = _S_SIZE.search(name)
    return int(m.group(1)) if m else st_size


def dir_stat(folder_fd: int, sub: str) -> os.stat_result | None:
    try:
        st = os.stat(sub, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st if stat.S_ISDIR(st.st_mode) else None


def scan_dir(
    folder_fd: int, sub: str, folder: str, *, older_than: tuple[str, float] | None = None
) -> tuple[DirSummary, list[MsgFile]] | None:
    """All messages in one cur/ or new/ directory: one stat per file, names from readdir.

    With older_than=("mtime"|"ctime", t) only messages whose time is before t are
    returned (a prefilter for delete rules; the summary still covers every message).

    This loop runs once per message of every scanned mailbox, so it does as little per
    file as it can (bench/retention.py: a full run is measured against `find`): names
    from listdir (no DirEntry objects: every file is stat'ed anyway), fstatat through
    the directory descriptor, the file type from the mode bits, and the ",S=" size
    read inline (the same expression as message_size).
    """
    try:
        fd = open_dir(folder_fd, sub)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink where cur/ or new/ should be
            return None
        raise
    by_ctime = older_than is not None and older_than[0] == "ctime"
    limit = older_than[1] if older_than is not None else NO_TIME * 2
    try:
        dst = os.fstat(fd)
        files: list[MsgFile] = []
        append = files.append
        total = count = 0
        min_m = min_c = NO_TIME
        lstat = os.stat
        search = _S_SIZE.search
        ifmt, ifreg = _S_IFMT, stat.S_IFREG
        for name in os.listdir(fd):
            if name[0] == ".":
                continue
            try:
                st = lstat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_mode & ifmt != ifreg:
                continue
            size = int(sm[1]) if ",S=" in name and (sm := search(name)) is not None else st.st_size
            m, c = st.st_mtime, st.st_ctime
            total += size
            count += 1
            if m < min_m:
                min_m = m
            if c < min_c:
                min_c = c
            if (c if by_ctime else m) < limit:
                append(MsgFile(folder, sub, name, size, m, c, st.st_ino))
    finally:
        os.close(fd)
    summary = DirSummary(
        dst.st_dev, dst.st_ino, dst.st_mtime_ns, dst.st_ctime_ns, count, total, min_m, min_c
    )
    return summary, files


# --------------------------------------------------------------------------- deleting


def unlink_message(sub_fd: int, f: MsgFile) -> str:
    """Delete one scanned message: "deleted", "vanished" (gone or renamed) or "changed"."""
    name = f.name
    if not name or "/" in name or name[0] == ".":
        return "changed"
    try:
        st = os.stat(name, dir_fd=sub_fd, follow_symlinks=False)
    except FileNotFoundError:
        return "vanished"
    if not stat.S_ISREG(st.st_mode) or st.st_ino != f.ino:
        return "changed"
    try:
        os.unlink(name, dir_fd=sub_fd)
    except FileNotFoundError:
        return "vanished"
    return "deleted"


def exists(sub_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=sub_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def iter_subdirs(folder_fd: int) -> Iterator[tuple[str, int]]:
    """Open new/ and cur/ of a folder in turn (closed after each step)."""
    for sub in SUBDIRS:
        try:
            fd = open_dir(folder_fd, sub)
        except OSError:
            continue
        try:
            yield sub, fd
        finally:
            os.close(fd)


def folder_usage(
    root_fd: int, layout: str, want: Callable[[str], bool] | None = None
) -> Iterator[tuple[Folder, int, int]]:
    """(folder, bytes, messages) of each folder of a mailbox (those `want` accepts),
    counted from the directories themselves (what a Maildir++ recalculation counts); an
    unreadable folder is skipped."""
    for folder in list_folders(root_fd, layout, want):
        try:
            ffd = open_folder(root_fd, folder)
        except OSError:
            continue
        b = c = 0
        try:
            for sub in SUBDIRS:
                res = scan_dir(ffd, sub, folder.name)
                if res is not None:
                    b += res[0].bytes
                    c += res[0].messages
        finally:
            os.close(ffd)
        yield folder, b, c
