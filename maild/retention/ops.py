"""Retention's part of `maild report` and `maild doctor`.

The report shows what the jobs deleted (count and bytes per rule) and the quota changes
(shrunk, restored); the doctor checks that the mail store is where the path template
says, looks like Maildir, and that the access source (Dovecot's log) is readable and has
recent login lines, without which every mailbox would look idle.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from maild.config import Config
from maild.doctor import Finding, fail, ok, warn
from maild.store.base import Store

_LOGIN = re.compile(
    rb"(imap|pop3)-login: (?:Info: )?(?:Login|Logged in): user=<|imapd: LOGIN, user="
)


async def report_section(store: Store, since: float, until: float) -> tuple[str, dict] | None:
    rows = await store.fetchall(
        "SELECT rule, COUNT(*), COALESCE(SUM(size), 0) FROM retention_deletions "
        "WHERE status = 'deleted' AND ts >= ? AND ts < ? GROUP BY rule ORDER BY rule",
        (since, until),
    )
    shrunk = await store.fetchone(
        "SELECT COUNT(*) FROM retention_mailboxes WHERE shrunk_at >= ? AND shrunk_at < ?",
        (since, until),
    )
    restored = await store.fetchone(
        "SELECT COUNT(*) FROM retention_mailboxes WHERE restored_at >= ? AND restored_at < ?",
        (since, until),
    )
    return "retention", {
        "deleted_messages": sum(r[1] for r in rows),
        "deleted_bytes": sum(r[2] for r in rows),
        "by_rule": {r[0]: {"messages": r[1], "bytes": r[2]} for r in rows},
        "quota_shrunk": shrunk[0] if shrunk else 0,
        "quota_restored": restored[0] if restored else 0,
    }


def _base(template: str) -> Path:
    """The fixed part of a path template: /var/vmail/%d/%n/Maildir -> /var/vmail."""
    parts = []
    for p in Path(template).parts:
        if "%" in p:
            break
        parts.append(p)
    return Path(*parts) if parts else Path("/")


def doctor_checks(config: Config) -> list[Finding]:
    rc = config.sections.get("retention")
    if rc is None or not rc.enabled:
        return [ok("mail-store", "retention is off ([retention] has no rules)")]
    out: list[Finding] = []
    base = _base(rc.resolve(rc.store.path))
    if not base.is_dir():
        out.append(
            fail(
                "mail-store",
                f"{base} (from [retention.store] path) does not exist",
                "set [retention.store] path to the mail store's template, e.g. "
                "/var/vmail/%d/%n/Maildir",
            )
        )
    elif not os.access(base, os.R_OK | os.X_OK):
        out.append(
            fail(
                "mail-store",
                f"{base} is not readable by uid {os.getuid()}",
                "add the maild user to the group owning the store (docs/install.md)",
            )
        )
    else:
        sample = []
        for root, dirs, _files in os.walk(base):
            if {"cur", "new", "tmp"} <= set(dirs):
                sample.append(root)
                dirs.clear()
            if len(sample) >= 5 or root.count(os.sep) - str(base).count(os.sep) > 4:
                dirs.clear()
        if sample:
            out.append(ok("mail-store", f"{base} readable; Maildirs found, e.g. {sample[0]}"))
        else:
            out.append(
                warn(
                    "mail-store",
                    f"{base} readable but no Maildir (cur/new/tmp) found in it",
                    "check [retention.store] path and layout",
                )
            )
    log = rc.access.dovecot_log
    if not log:
        out.append(
            warn(
                "access-log",
                "no [retention.access] dovecot_log: idle clocks only move with "
                "`maild access touch`",
                'set dovecot_log = "/var/log/mail.log" or "journal"',
            )
        )
    elif log == "journal":
        if shutil.which("journalctl") is None:
            out.append(
                fail(
                    "access-log",
                    "dovecot_log = journal, but journalctl is not installed",
                    "install systemd, or point dovecot_log at Dovecot's log file",
                )
            )
        else:
            out.append(ok("access-log", "following the journal"))
    else:
        p = Path(rc.resolve(log))
        try:
            with p.open("rb") as f:
                f.seek(max(0, p.stat().st_size - 1024 * 1024))
                tail = f.read()
        except OSError as e:
            out.append(
                fail(
                    "access-log",
                    f"cannot read {p}: {e.strerror}",
                    "add the maild user to group adm, or fix dovecot_log",
                )
            )
        else:
            if _LOGIN.search(tail):
                out.append(ok("access-log", f"{p} readable, recent POP/IMAP login lines seen"))
            else:
                out.append(
                    warn(
                        "access-log",
                        f"{p} readable but no POP/IMAP login line in its last MB",
                        "check that Dovecot logs there (log_path / syslog facility mail)",
                    )
                )
    return out
