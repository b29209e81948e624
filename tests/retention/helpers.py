"""Building Maildir trees and configurations for the retention tests."""

from __future__ import annotations

import itertools
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from maild.components import load
from maild.retention import mutf7
from maild.retention.config import RetentionConfig, retention_of

DAY = 86400.0
_seq = itertools.count(1)


def folder_dir(mailbox: Path, folder: str, layout: str = "maildir++") -> Path:
    """The on-disk directory of a decoded folder name ("INBOX", "Trash", "A/B")."""
    if folder == "INBOX":
        return mailbox
    parts = [mutf7.encode(p) for p in folder.split("/")]
    if layout == "fs":
        return mailbox.joinpath(*parts)
    return mailbox / ("." + ".".join(parts))


def make_maildir(path: Path, folders: tuple[str, ...] = (), layout: str = "maildir++") -> Path:
    for folder in ("INBOX", *folders):
        d = folder_dir(path, folder, layout)
        for sub in ("cur", "new", "tmp"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        if folder != "INBOX" and layout == "maildir++":
            (d / "maildirfolder").touch()
    return path


def add_msg(
    mailbox: Path,
    folder: str = "INBOX",
    *,
    size: int = 100,
    mtime: float | None = None,
    sub: str = "cur",
    layout: str = "maildir++",
    name: str | None = None,
    with_s: bool = True,
) -> Path:
    """One message; its mtime (received date) is set, its ctime is "now" (saved now)."""
    d = folder_dir(mailbox, folder, layout) / sub
    d.mkdir(parents=True, exist_ok=True)
    n = next(_seq)
    if name is None:
        base = f"{1700000000 + n}.M{n}P{os.getpid()}.test"
        if with_s:
            base += f",S={size}"
        name = base + (":2,S" if sub == "cur" else "")
    p = d / name
    p.write_bytes(b"x" * size)
    if mtime is not None:
        os.utime(p, (mtime, mtime))
    return p


def fs_tick(directory: Path, after_ns: int) -> None:
    """Wait until the file system's clock is past after_ns (coarse timestamps), by making
    probe files, so files made next have a strictly later ctime."""
    probe = directory / ".tick-probe"
    while True:
        probe.write_bytes(b"")
        st = os.stat(probe)
        os.unlink(probe)
        if st.st_ctime_ns > after_ns:
            return


def write_config(tmp: Path, body: str, *, mail: Path | None = None) -> Path:
    cfg = tmp / "policies.toml"
    text = textwrap.dedent(body)
    if mail is not None:
        text = text.replace("@MAIL@", str(mail))
    cfg.write_text(text)
    return cfg


def retention(cfg_path: Path) -> RetentionConfig:
    return retention_of(load(cfg_path))


STORE = """
[retention.store]
layout = "{layout}"
path = "@MAIL@/%d/%n/Maildir"
root_mailboxes = ["root@*"]
"""

KEYDATA_RULES = """
[[retention.rules]]
name = "trash"
folders = ["\\\\Trash"]
age = "7d"
age_by = "saved"

[[retention.rules]]
name = "idle"
folders = ["*"]
idle = "60d"
age = "90d"
age_by = "received"

[[retention.rules]]
name = "shrink"
mailboxes = "root"
idle = "90d"
action = "shrink"
quota = "1MB"
"""


def keydata_config(tmp: Path, mail: Path, layout: str = "maildir++", extra: str = "") -> Path:
    return write_config(
        tmp, "[retention]\n" + STORE.format(layout=layout) + extra + KEYDATA_RULES, mail=mail
    )


def files_in(mailbox: Path) -> set[str]:
    """Every regular file below cur/ and new/ dirs, as paths relative to the mailbox."""
    out = set()
    for dirpath, _dirs, names in os.walk(mailbox):
        if os.path.basename(dirpath) in ("cur", "new"):
            for n in names:
                out.add(os.path.relpath(os.path.join(dirpath, n), mailbox))
    return out


try:  # the shared harness (tests/harness), when it is importable
    from harness import require_binary, require_root, skip_or_fail
except ImportError:  # the same rules, locally: skip on a laptop, fail under CI=true

    def skip_or_fail(reason: str) -> None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: integration prerequisites must be present)")
        pytest.skip(reason)

    def require_binary(name: str) -> str:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
        if path is None:
            skip_or_fail(f"{name} not installed")
        return str(path)

    def require_root() -> None:
        if os.geteuid() != 0:
            skip_or_fail("this test needs root")


__all__ = ["require_binary", "require_root", "skip_or_fail"]
