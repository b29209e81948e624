"""Which mailboxes exist, where they live, and which of them are "root" mailboxes.

Mailboxes come from the path template (e.g. /var/vmail/%d/%n/Maildir, walked on disk)
or from a list of users. A user name becomes a path only if it is a plain name: a
login name such as "../x" never reaches the file system.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass

from maild.retention.config import StoreSettings

log = logging.getLogger("maild.retention")
_VAR = re.compile(r"%(L?)([und%])")


@dataclass(frozen=True, slots=True)
class Mailbox:
    user: str
    path: str


def safe_user(user: str) -> bool:
    """A user name that can be put into a path: no separators, no dot-names, no NUL."""
    if not user or len(user) > 320 or "/" in user or "\0" in user or "\n" in user:
        return False
    local, _, domain = user.partition("@")
    return all(
        p not in (".", "..") and not p.startswith(".") for p in (user, local, domain) if p
    ) and bool(local)


def normalize_user(user: str) -> str:
    """Dovecot lowercases user names by default (auth_username_format = %Lu); so does maild."""
    return user.strip().lower()


def user_path(template: str, user: str) -> str:
    """The mailbox path of a user; ValueError if the name is not safe for a path."""
    if not safe_user(user):
        raise ValueError(f"not a usable user name: {user!r}")
    local, _, domain = user.partition("@")
    values = {"u": user, "n": local, "d": domain, "%": "%"}
    if "%d" in template.replace("%Ld", "%d") and not domain:
        raise ValueError(f"user {user!r} has no domain, but the path template needs %d")
    return _VAR.sub(
        lambda m: values[m.group(2)].lower() if m.group(1) else values[m.group(2)], template
    )


def _component_regex(part: str) -> tuple[re.Pattern[str], list[str]]:
    names: list[str] = []
    out = ["^"]
    pos = 0
    for m in _VAR.finditer(part):
        out.append(re.escape(part[pos : m.start()]))
        var = m.group(2)
        if var == "%":
            out.append("%")
        else:
            names.append(var)
            out.append(
                f"(?P<g{len(names) - 1}>[^/]+?)"
                if var != "d"
                else f"(?P<g{len(names) - 1}>[^/@]+?)"
            )
        pos = m.end()
    out.append(re.escape(part[pos:]) + "$")
    return re.compile("".join(out)), names


def walk_template(template: str) -> list[Mailbox]:
    """Find every mailbox the template describes. Below the first variable component,
    symlinked and hidden directories are skipped (never followed)."""
    parts = [p for p in template.split("/") if p]
    current: list[tuple[str, dict[str, str]]] = [("/", {})]
    below_var = False
    for part in parts:
        has_var = any(m.group(2) != "%" for m in _VAR.finditer(part))
        nxt: list[tuple[str, dict[str, str]]] = []
        if not has_var:
            lit = part.replace("%%", "%")
            for base, vals in current:
                path = os.path.join(base, lit)
                if below_var:
                    try:
                        if not stat.S_ISDIR(os.lstat(path).st_mode):
                            continue
                    except OSError:
                        continue
                nxt.append((path, vals))
            current = nxt
            continue
        below_var = True
        rx, names = _component_regex(part)
        for base, vals in current:
            try:
                with os.scandir(base) as it:
                    entries = [
                        e.name
                        for e in it
                        if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
                    ]
            except OSError:
                continue
            for name in sorted(entries):
                m = rx.match(name)
                if not m:
                    continue
                v = dict(vals)
                ok = True
                for i, var in enumerate(names):
                    val = m.group(f"g{i}")
                    if v.get(var, val) != val:
                        ok = False
                    v[var] = val
                if ok:
                    nxt.append((os.path.join(base, name), v))
        current = nxt
    out: list[Mailbox] = []
    for path, vals in current:
        if "u" in vals:
            user = vals["u"]
        elif vals.get("d"):
            user = f"{vals.get('n', '')}@{vals['d']}"
        else:
            user = vals.get("n", "")
        user = normalize_user(user)
        if safe_user(user):
            out.append(Mailbox(user, path))
    return out


def read_user_list(path: str) -> list[str]:
    users = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                users.append(normalize_user(line.split()[0]))
    return users


def find_mailboxes(store: StoreSettings, resolve: Callable[[str], str]) -> list[Mailbox]:
    """Every mailbox with a Maildir on disk, each once (two names for one directory
    would otherwise be processed twice)."""
    if store.users_file:
        found = []
        for user in read_user_list(resolve(store.users_file)):
            try:
                found.append(Mailbox(user, user_path(store.path, user)))
            except ValueError as e:
                log.warning("retention: skipped user=%s reason=%s", user, e)
    else:
        found = walk_template(store.path)
    seen: set[tuple[int, int]] = set()
    out = []
    for mb in found:
        try:
            st = os.stat(mb.path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            log.warning(
                "retention: skipped user=%s reason=same directory as another mailbox path=%s",
                mb.user,
                mb.path,
            )
            continue
        seen.add(key)
        out.append(mb)
    return out


class RootMailboxes:
    """Matches the root mailboxes: glob patterns from the config plus a list file."""

    def __init__(self, store: StoreSettings, resolve: Callable[[str], str]):
        self.patterns = store.root_mailboxes
        self.users: set[str] = set()
        self.problem = ""
        if store.root_mailboxes_file:
            path = resolve(store.root_mailboxes_file)
            try:
                self.users = set(read_user_list(path))
            except OSError as e:
                self.problem = f"cannot read root_mailboxes_file {path}: {e.strerror}"

    def __contains__(self, user: str) -> bool:
        return user in self.users or any(fnmatch.fnmatchcase(user, p) for p in self.patterns)
