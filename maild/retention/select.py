"""What a rule deletes: a pure function of file metadata, the rule, the clock and access.

No I/O here, so every decision can be tested exhaustively. Ages follow Dovecot:
"saved" is the time a message has been in its folder (ctime on Maildir: a move into
Trash is a rename, which sets ctime), "received" is the delivery date (mtime, which
never changes). Trash is never aged by received date unless the rule says so, or old
mail trashed today would go at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

from maild.retention.config import RetentionRule, StoreSettings
from maild.retention.maildir import MsgFile

FolderMatch = Callable[[str], bool]


@lru_cache(maxsize=256)
def _list_pattern(pattern: str) -> re.Pattern[str]:
    """IMAP LIST wildcards: '*' matches anything, '%' anything but the hierarchy '/'."""
    out = []
    for c in pattern:
        if c == "*":
            out.append(".*")
        elif c == "%":
            out.append("[^/]*")
        else:
            out.append(re.escape(c))
    return re.compile("^" + "".join(out) + "$", re.DOTALL)


def _one(selector: str, store: StoreSettings) -> FolderMatch:
    if selector == "*":
        return lambda name: True
    if selector.startswith("\\"):
        names = {n.casefold() for n in store.aliases(selector[1:])}
        return lambda name: name.casefold() in names
    if selector.upper() == "INBOX":
        return lambda name: name == "INBOX"
    if "*" in selector or "%" in selector:
        if selector.upper().startswith("INBOX/"):
            selector = "INBOX" + selector[5:]
        rx = _list_pattern(selector)
        return lambda name: bool(rx.match(name))
    return lambda name: name == selector


def folder_matcher(rule: RetentionRule, store: StoreSettings) -> FolderMatch:
    """True for the folders a rule applies to (its folders minus its exclude_folders)."""
    inc = [_one(s, store) for s in rule.folders]
    exc = [_one(s, store) for s in rule.exclude_folders]
    return lambda name: any(m(name) for m in inc) and not any(m(name) for m in exc)


def quota_counts(store: StoreSettings, ignore: Sequence[str]) -> FolderMatch:
    """True for folders the quota counts (Dovecot: all; Courier: all but Trash)."""
    exc = [_one(s, store) for s in ignore]
    return lambda name: not any(m(name) for m in exc)


def is_idle(idle: float | None, idle_since: float, now: float) -> bool:
    """A rule without an idle condition applies to every mailbox."""
    return idle is None or now - idle_since > idle


def timestamp(f: MsgFile, age_by: str) -> float:
    return f.ctime if age_by == "saved" else f.mtime


def cutoff(age: float, now: float) -> float:
    """Messages whose time is strictly before this are older than `age`."""
    return now - age


def expired(files: Iterable[MsgFile], age: float, age_by: str, now: float) -> list[MsgFile]:
    limit = cutoff(age, now)
    if age_by == "saved":
        return [f for f in files if f.ctime < limit]
    return [f for f in files if f.mtime < limit]


def oldest_until(
    files: Iterable[MsgFile], usage: int, limit: int, age_by: str, min_age: float | None, now: float
) -> list[MsgFile]:
    """Oldest first until usage <= limit; never a message younger than min_age."""
    if usage <= limit:
        return []
    order = sorted(files, key=lambda f: (timestamp(f, age_by), f.folder, f.sub, f.name))
    floor = cutoff(min_age, now) if min_age else None
    out = []
    for f in order:
        if usage <= limit:
            break
        if floor is not None and timestamp(f, age_by) >= floor:
            break
        out.append(f)
        usage -= f.size
    return out


def plan(
    rule: RetentionRule,
    files: Sequence[MsgFile],
    now: float,
    *,
    selected: FolderMatch,
    counted: FolderMatch,
) -> list[MsgFile]:
    """The messages of one (idle, if the rule says so) mailbox that the rule deletes.

    `files` are all scanned messages of the mailbox; for "delete" only the rule's folders
    need to have been scanned.
    """
    decided: dict[str, bool] = {}
    for name in {f.folder for f in files}:
        decided[name] = selected(name)
    mine = files if all(decided.values()) else [f for f in files if decided[f.folder]]
    if rule.action == "delete":
        assert rule.age is not None
        return expired(mine, rule.age, rule.age_by, now)
    if rule.action == "trim":
        assert rule.max_size is not None
        usage = sum(f.size for f in mine)
        return oldest_until(mine, usage, rule.max_size, rule.age_by, rule.age, now)
    if rule.action == "shrink":
        assert rule.quota is not None
        counts = {name: counted(name) for name in decided}
        usage = sum(f.size for f in files if counts[f.folder])
        useful = [f for f in mine if counts[f.folder]]
        return oldest_until(useful, usage, rule.quota, rule.age_by, None, now)
    raise ValueError(f"unknown action {rule.action!r}")
