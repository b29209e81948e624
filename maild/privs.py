"""Run unprivileged: refuse unsafe files, and drop root right after binding.

`maild serve` started as root binds its listening socket (port 25 needs root or
CAP_NET_BIND_SERVICE), then becomes `[server] user` (its primary group and
supplementary groups, as Postfix's daemons do) before it opens any state or reads any
mail. Running on as root needs `--allow-root` (containers, tests); the systemd unit never
needs it because it starts maild as its user.

A policies.toml or state directory that anyone may write would let any local user
change the policy or forge the consent evidence, so maild refuses to start on them.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Sequence
from pathlib import Path


class PrivilegeError(Exception):
    """Starting would be unsafe; the message says what to change."""


def check_files(config_path: str, state_path: str) -> None:
    p = Path(config_path)
    try:
        st = p.stat()
    except OSError as e:
        raise PrivilegeError(f"cannot stat {p}: {e.strerror}") from None
    if st.st_mode & stat.S_IWOTH:
        raise PrivilegeError(
            f"{p} is world-writable (mode {stat.S_IMODE(st.st_mode):04o}): anyone "
            f"could change the policy; run: chmod o-w {p}"
        )
    d = Path(state_path).parent
    if d.exists():
        dst = d.stat()
        if dst.st_mode & stat.S_IWOTH:
            raise PrivilegeError(
                f"state directory {d} is world-writable (mode "
                f"{stat.S_IMODE(dst.st_mode):04o}): anyone could alter maild's state "
                f"and evidence; run: chmod o-w {d}"
            )


def resolve_user(name: str) -> tuple[int, int, list[int]]:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(
            f'[server] user = "{name}": no such user; create it with '
            f"adduser --system --group {name}"
        ) from None
    groups = [g.gr_gid for g in grp.getgrall() if name in g.gr_mem]
    return pw.pw_uid, pw.pw_gid, sorted({pw.pw_gid, *groups})


def prepare_state_dir(state_path: str, uid: int, gid: int) -> None:
    """As root, make sure the state directory exists and belongs to the user."""
    d = Path(state_path).parent
    d.mkdir(parents=True, exist_ok=True, mode=0o750)
    for p in [d, *[d / n for n in os.listdir(d) if n.startswith(Path(state_path).name)]]:
        if not p.is_symlink():
            os.chown(p, uid, gid)


# Loaded before root is dropped, as Postfix's daemons open what they need before chroot:
# afterwards the interpreter's own files may not be readable by the user. These are the
# standard library's and the dependencies'; maild's own modules come from the components
# (maild.components, preloads).
PRELOAD = (
    "sqlite3",
    "aiosqlite",
    "email.parser",
    "email.policy",
    "email.headerregistry",
    "email.feedparser",
    "email.generator",
    "email.mime.text",
    "email.utils",
    "email._header_value_parser",
    "html.parser",
    "hashlib",
    "encodings.idna",
    "encodings.utf_8",
    "encodings.latin_1",
    "encodings.ascii",
    "encodings.utf_16",
    "encodings.punycode",
    "stringprep",
    "unicodedata",
    "zlib",
    "gzip",
    "json",
    "uuid",
    "dns.asyncresolver",
    "dns.resolver",
    "dns.rdtypes.ANY.MX",
    "dns.rdtypes.IN.A",
    "dns.rdtypes.IN.AAAA",
    "dns.rdtypes.ANY.TXT",
    "dns.rdtypes.ANY.CNAME",
    "dns.rdtypes.ANY.SOA",
    "dns.rdtypes.ANY.NS",
    "dns.rdtypes.ANY.PTR",
    "apscheduler.schedulers.asyncio",
    "apscheduler.triggers.cron",
    "apscheduler.triggers.interval",
    "apscheduler.executors.asyncio",
    "apscheduler.executors.pool",
    "apscheduler.jobstores.memory",
    "concurrent.futures.thread",
    "tzlocal",
    "zoneinfo",
)


def preload(own: Sequence[str] = ()) -> list[str]:
    """Import every module maild may need later: maild's own (own), which must be there,
    and PRELOAD, of which an optional one may be missing; returns those missing."""
    import importlib

    for mod in own:
        importlib.import_module(mod)
    missing = []
    for mod in PRELOAD:
        try:
            importlib.import_module(mod)
        except ImportError:  # an optional dependency (tzlocal, ...) not installed
            missing.append(mod)
    return missing


def drop(user: str, state_path: str, own: Sequence[str] = ()) -> tuple[int, int]:
    """Become `user` for good (no way back to root), maild's modules own loaded first;
    returns (uid, gid)."""
    uid, gid, groups = resolve_user(user)
    preload(own)
    if uid == 0:
        raise PrivilegeError(f'[server] user = "{user}" is root: choose an unprivileged user')
    prepare_state_dir(state_path, uid, gid)
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() == 0 or os.geteuid() == 0:  # pragma: no cover - the kernel said no
        raise PrivilegeError("could not drop root privileges")
    return uid, gid
