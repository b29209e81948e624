"""What an operator asks about retention: one mailbox, or the state of all rules.

Read-only: nothing here writes to the mail store or the state store. "What the next
run would delete" is a dry run of every rule for the one mailbox, at the time that
rule runs next, with the access known now.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from typing import Any

from maild.retention import quota, state
from maild.retention.config import RetentionConfig
from maild.retention.jobs import RunError, Runner
from maild.retention.mailboxes import user_path
from maild.retention.maildir import folder_usage, open_root
from maild.retention.scheduler import next_runs
from maild.retention.select import quota_counts
from maild.store.base import Store


def _folders_usage(cfg: RetentionConfig, path: str) -> tuple[list[dict[str, Any]], dict | None]:
    counted = quota_counts(cfg.store, cfg.quota.ignore_folders)
    root_fd = open_root(path)
    try:
        md = quota.read(root_fd)
        original = quota.read_original(root_fd)
        out = [
            {
                "folder": folder.name,
                "messages": n,
                "bytes": b,
                "quota_counted": counted(folder.name),
            }
            for folder, b, n in folder_usage(root_fd, cfg.store.layout)
        ]
    finally:
        os.close(root_fd)
    mds = None
    if md is not None:
        mds = {
            "limit": md.limit_line,
            "bytes_limit": md.bytes_limit,
            "count_limit": md.count_limit,
            "usage_bytes": md.usage_bytes,
            "usage_count": md.usage_count,
        }
    if original is not None:
        mds = (mds or {}) | {"original_file": original}
    return out, mds


def dovecot_view(doveadm: tuple[str, ...], user: str) -> dict[str, Any]:
    """What Dovecot itself enforces for the user (doveadm quota get / user), to check that
    maild's limit really reaches it."""
    out: dict[str, Any] = {}
    try:
        q = subprocess.run(
            [*doveadm, "quota", "get", "-u", user],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        u = subprocess.run(
            [*doveadm, "user", "-f", "quota_rule", user],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": str(e)}
    if q.returncode != 0:
        return {"error": (q.stderr or q.stdout).strip()[:300]}
    for line in q.stdout.splitlines():
        fields = line.split()
        if "STORAGE" in fields:
            i = fields.index("STORAGE")
            out["storage_used_kb"], out["storage_limit_kb"] = fields[i + 1], fields[i + 2]
        elif "MESSAGE" in fields:
            i = fields.index("MESSAGE")
            out["messages"], out["message_limit"] = fields[i + 1], fields[i + 2]
    out["quota_rule"] = u.stdout.strip() if u.returncode == 0 else ""
    return out


async def mailbox_info(
    cfg: RetentionConfig,
    store: Store,
    user: str,
    *,
    now: float | None = None,
    dovecot: bool = False,
) -> dict[str, Any]:
    now = time.time() if now is None else now
    try:
        path = user_path(cfg.store.path, user)
    except ValueError as e:
        raise RunError(str(e)) from None
    row = await state.mailbox(store, user)
    info: dict[str, Any] = {"user": user, "path": path, "exists": os.path.isdir(path)}
    if row is None:
        info |= {
            "known": False,
            "first_seen": None,
            "last_access": None,
            "access_source": "",
            "idle_days": 0.0,
        }
    else:
        info |= {
            "known": True,
            "first_seen": row.first_seen,
            "last_access": row.last_access,
            "access_source": row.access_source,
            "idle_days": round((now - row.idle_since) / 86400, 1),
            "quota_state": row.quota_state,
            "original_quota": row.original_quota,
            "shrunk_quota": row.shrunk_quota,
            "shrunk_at": row.shrunk_at,
            "shrunk_rule": row.shrunk_rule,
            "restored_at": row.restored_at,
        }
    info.setdefault("quota_state", "normal")
    runner = Runner(cfg, store)
    if runner.userdb is not None:
        info["dovecot_userdb_limit"] = await asyncio.to_thread(runner.userdb.limit, user)
    if info["exists"]:
        folders, mds = await asyncio.to_thread(_folders_usage, cfg, path)
        info["folders"] = folders
        info["maildirsize"] = mds
        info["usage_bytes"] = sum(f["bytes"] for f in folders if f["quota_counted"])
        upcoming = []
        when = next_runs(cfg, now)
        for rule in cfg.rules:
            at = when.get(rule.name) or now
            try:
                rep = await runner.run(rule.name, dry_run=True, user=user, now=at, quiet=True)
            except RunError as e:
                upcoming.append({"rule": rule.name, "at": at, "error": str(e)})
                continue
            files = [p for p in rep.planned if p["action"] == "delete"]
            entry = {
                "rule": rule.name,
                "at": at,
                "scheduled": when.get(rule.name) is not None,
                "delete": len(files),
                "bytes": sum(p["size"] for p in files),
                "files": files,
            }
            shrink = [p for p in rep.planned if p["action"] == "shrink"]
            if shrink:
                entry["shrink_to"] = shrink[0]["quota"]
            upcoming.append(entry)
        info["next"] = upcoming
    info["recent_deletions"] = await state.deletions(store, user=user, limit=10)
    if dovecot:
        info["dovecot"] = await asyncio.to_thread(dovecot_view, cfg.quota.doveadm, user)
    return info


async def status_info(
    cfg: RetentionConfig, store: Store, *, now: float | None = None
) -> dict[str, Any]:
    now = time.time() if now is None else now
    when = next_runs(cfg, now)
    last = await state.last_runs(store)
    rules = []
    for rule in cfg.rules:
        rules.append(
            {
                "rule": rule.name,
                "action": rule.action,
                "schedule": rule.schedule,
                "enabled": rule.enabled,
                "next_run": when.get(rule.name),
                "last_run": last.get(rule.name),
            }
        )
    counts = await store.fetchone(
        "SELECT count(*), sum(quota_state != 'normal'), sum(last_access IS NULL) "
        "FROM retention_mailboxes"
    )
    pend = await store.fetchone("SELECT count(*) FROM retention_deletions WHERE status = 'pending'")
    positions = await state.log_positions(store)
    return {
        "enabled": cfg.enabled,
        "rules": rules,
        "mailboxes_known": (counts[0] or 0) if counts else 0,
        "mailboxes_shrunk": (counts[1] or 0) if counts else 0,
        "mailboxes_never_accessed": (counts[2] or 0) if counts else 0,
        "pending_deletions": pend[0] if pend else 0,
        "access_sources": [
            {"source": s, "inode": i, "offset": o, "cursor": c, "updated": u}
            for s, i, o, c, u in positions
        ],
    }
