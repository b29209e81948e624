"""The [retention] section of policies.toml: rules as data, the mail store, access, quota.

Every rule names what it selects (folders, mailboxes, idle time, age and how age is
measured) and what it does (delete, trim to a size, shrink the quota). The parser
refuses rules whose effect would be "delete everything" (a delete without an age, a
shrink without an idle condition, a Trash rule aged by received date without saying
so), because a typo in a retention policy loses mail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from maild.config import Reader
from maild.retention import state as _state  # noqa: F401  (registers the schema)

RULE_ACTIONS = ("delete", "trim", "shrink")
LAYOUTS = ("maildir++", "fs")
MAILBOX_KINDS = ("all", "root", "other")
AGE_BY = {"saved": "saved", "ctime": "saved", "received": "received", "mtime": "received"}
SCHEDULE_WORDS = ("daily", "hourly", "weekly", "manual")
DEFAULT_SPECIAL_USE = {
    "Trash": ("Trash", "Deleted Items", "Deleted Messages"),
    "Junk": ("Junk", "Spam", "Junk E-mail", "Junk Email"),
    "Sent": ("Sent", "Sent Items", "Sent Messages"),
    "Drafts": ("Drafts",),
    "Archive": ("Archive", "Archives"),
}
_TEMPLATE_VAR = re.compile(r"%(?:L?[und]|%)")
_RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class RetentionRule:
    """One retention rule; see docs/retention.md for the meaning of every field."""

    name: str
    action: str = "delete"
    folders: tuple[str, ...] = ("*",)
    exclude_folders: tuple[str, ...] = ()
    mailboxes: str = "all"
    users: tuple[str, ...] = ()
    idle: float | None = None  # seconds without POP/IMAP access, None = any mailbox
    age: float | None = None  # seconds; for trim: never delete younger mail
    age_by: str = "received"  # "saved" (ctime, time in folder) | "received" (mtime)
    quota: int | None = None  # shrink: the reduced limit in bytes
    max_size: int | None = None  # trim: the size to trim the selected folders down to
    schedule: str = "daily"  # as written
    cron: str = ""  # 5-field crontab, "" for manual
    enabled: bool = True


@dataclass(frozen=True)
class StoreSettings:
    layout: str = "maildir++"
    path: str = ""  # template, e.g. /var/vmail/%d/%n/Maildir
    users_file: str = ""  # one user per line; "" = walk the path template
    root_mailboxes: tuple[str, ...] = ()
    root_mailboxes_file: str = ""
    special_use: tuple[tuple[str, tuple[str, ...]], ...] = tuple(DEFAULT_SPECIAL_USE.items())
    lock_dir: str = ""  # "" = retention-locks/ next to maild's state store

    def aliases(self, use: str) -> tuple[str, ...]:
        for name, names in self.special_use:
            if name.lower() == use.lower():
                return names
        return ()


@dataclass(frozen=True)
class AccessSettings:
    dovecot_log: str = ""  # a file path, "journal", or "" (no log following)
    journal_match: tuple[str, ...] = ("SYSLOG_IDENTIFIER=dovecot",)
    last_login_dict: str = ""  # Dovecot file dict written by the last_login plugin
    last_login_key_prefix: str = "shared/last-login/"
    poll_interval: float = 1.0
    import_interval: float = 300.0


@dataclass(frozen=True)
class QuotaSettings:
    maildirsize: bool = True  # write the limit to line 1 of maildirsize
    ignore_folders: tuple[str, ...] = ()  # folders the quota does not count (Courier: Trash)
    dovecot_userdb: str = ""  # passwd-file maild maintains: userdb_quota_rule overrides
    doveadm: tuple[str, ...] = ("doveadm",)
    flush_auth_cache: bool = False
    recalc: bool = False  # run `doveadm quota recalc` after deleting (count/dict quota)


@dataclass(frozen=True)
class RetentionConfig:
    enabled: bool = False
    rules: tuple[RetentionRule, ...] = ()
    store: StoreSettings = field(default_factory=StoreSettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    quota: QuotaSettings = field(default_factory=QuotaSettings)
    daily_at: str = "03:00"
    keep_records: float = 180 * 86400.0
    lock_timeout: float = 30.0
    config_dir: str = "."  # directory of policies.toml (relative paths start there)

    def rule(self, name: str) -> RetentionRule | None:
        return next((r for r in self.rules if r.name == name), None)

    def resolve(self, path: str) -> str:
        """A relative path in [retention] is relative to the directory of policies.toml."""
        if not path:
            return path
        p = Path(path)
        return str(p if p.is_absolute() else Path(self.config_dir) / p)


# --------------------------------------------------------------------------- helpers


def cron_for(schedule: str, daily_at: str) -> str:
    """'daily' / 'hourly' / 'weekly' / a crontab line into a 5-field crontab ('' = manual)."""
    hh, mm = (int(x) for x in daily_at.split(":"))
    words = {
        "daily": f"{mm} {hh} * * *",
        "hourly": f"{mm} * * * *",
        "weekly": f"{mm} {hh} * * sun",
        "manual": "",
    }
    return words.get(schedule, schedule)


def valid_cron(expr: str) -> bool:
    from apscheduler.triggers.cron import CronTrigger

    if len(expr.split()) != 5:
        return False
    try:
        CronTrigger.from_crontab(expr)
    except ValueError:
        return False
    return True


def template_problem(template: str) -> str | None:
    """Why a mailbox path template cannot be used, or None."""
    if not template.startswith("/"):
        return "an absolute path"
    if (
        "%u" not in template
        and "%n" not in template
        and "%Lu" not in template
        and "%Ln" not in template
    ):
        return "a path containing %u (user) or %n (local part)"
    rest = _TEMPLATE_VAR.sub("", template)
    if "%" in rest:
        return "a path whose only variables are %u, %n, %d (or %Lu, %Ln, %Ld) and %%"
    return None


# --------------------------------------------------------------------------- parsing


def _parse_store(r: Reader, *, required: bool) -> StoreSettings:
    d = StoreSettings()
    path = r.str("path", "")
    if not path and required:
        r.problems.append(
            f'{r.key("path")} is missing: it is required, e.g. "/var/vmail/%d/%n/Maildir"'
        )
    elif path and (why := template_problem(path)) is not None:
        r.error("path", path, why)
    su = r.table_of("special_use")
    special = dict(DEFAULT_SPECIAL_USE)
    for key in list(su.table):
        names = su.str_list(key)
        if not names:
            su.error(key, [], "a non-empty list of folder names")
            continue
        special[key] = names
    s = StoreSettings(
        layout=r.str("layout", d.layout, choices=LAYOUTS),
        path=path,
        users_file=r.str("users_file", ""),
        root_mailboxes=r.str_list("root_mailboxes", lower=True),
        root_mailboxes_file=r.str("root_mailboxes_file", ""),
        special_use=tuple(special.items()),
        lock_dir=r.str("lock_dir", d.lock_dir),
    )
    r.unknown()
    return s


def _parse_access(r: Reader) -> AccessSettings:
    d = AccessSettings()
    a = AccessSettings(
        dovecot_log=r.str("dovecot_log", ""),
        journal_match=r.str_list("journal_match", d.journal_match),
        last_login_dict=r.str("last_login_dict", ""),
        last_login_key_prefix=r.str("last_login_key_prefix", d.last_login_key_prefix),
        poll_interval=r.duration("poll_interval", d.poll_interval, positive=True),
        import_interval=r.duration("import_interval", d.import_interval, positive=True),
    )
    if a.poll_interval <= 0:
        r.error("poll_interval", a.poll_interval, 'a positive duration such as "1s"')
    if a.import_interval <= 0:
        r.error("import_interval", a.import_interval, 'a positive duration such as "5m"')
    r.unknown()
    return a


def _parse_quota(r: Reader) -> QuotaSettings:
    d = QuotaSettings()
    doveadm = r.str_list("doveadm", d.doveadm)
    if not doveadm:
        r.error(
            "doveadm",
            [],
            'a command such as ["doveadm"] or ["doveadm", "-c", "/etc/dovecot/dovecot.conf"]',
        )
        doveadm = d.doveadm
    q = QuotaSettings(
        maildirsize=r.bool("maildirsize", d.maildirsize),
        ignore_folders=r.str_list("ignore_folders"),
        dovecot_userdb=r.str("dovecot_userdb", ""),
        doveadm=doveadm,
        flush_auth_cache=r.bool("flush_auth_cache", d.flush_auth_cache),
        recalc=r.bool("recalc", d.recalc),
    )
    r.unknown()
    return q


def _opt_duration(r: Reader, name: str) -> float | None:
    return r.duration(name, 0) if r.has(name) else None


def _opt_size(r: Reader, name: str) -> int | None:
    return r.size(name, 0) if r.has(name) else None


def _parse_rule(r: Reader, daily_at: str, names: set[str]) -> RetentionRule:
    name = r.str("name", required=True)
    if name and not _RULE_NAME.match(name):
        r.error("name", name, "letters, digits, '.', '_' or '-' (it is used in logs and the CLI)")
    if name in names:
        r.error("name", name, "a name no other retention rule has")
    names.add(name)
    action = r.str("action", "delete", choices=RULE_ACTIONS)
    folders = r.str_list("folders", ("*",))
    if not folders:
        r.error("folders", [], 'a non-empty list, e.g. ["\\\\Trash"], ["INBOX"] or ["*"]')
    exclude = r.str_list("exclude_folders")
    for i, f in enumerate(folders + exclude):
        if not f:
            r.error(f"folders[{i}]", f, "a folder name, \\Special-use or a pattern with * and %")
    mailboxes = r.str("mailboxes", "all", choices=MAILBOX_KINDS)
    users = r.str_list("users", lower=True)
    idle = _opt_duration(r, "idle")
    age = _opt_duration(r, "age")
    age_by_raw = r.str("age_by", "")
    if age_by_raw and age_by_raw not in AGE_BY:
        r.error("age_by", age_by_raw, '"saved" (time in the folder, ctime) or "received" (mtime)')
    age_by = AGE_BY.get(age_by_raw, "received")
    quota = _opt_size(r, "quota")
    max_size = _opt_size(r, "max_size")
    schedule = r.str("schedule", "daily")
    cron = cron_for(schedule, daily_at) if schedule else ""
    if schedule not in SCHEDULE_WORDS and not valid_cron(cron):
        r.error(
            "schedule",
            schedule,
            '"daily", "hourly", "weekly", "manual" or a crontab line such as "30 3 * * *"',
        )
        cron = ""
    enabled = r.bool("enabled", True)

    if action == "delete":
        if age is None:
            r.problems.append(
                f"{r.key('age')} is missing: a delete rule needs an age "
                '(e.g. "7d"); without one it would delete every message'
            )
        elif not age_by_raw:
            r.problems.append(
                f"{r.key('age_by')} is missing: say how age is measured, "
                '"saved" (time in the folder, for Trash) or "received"'
            )
        for key in ("quota", "max_size"):
            if r.has(key):
                r.error(
                    key, r.table[key], f'no {key} for action "delete" (it is for "shrink"/"trim")'
                )
    elif action == "shrink":
        if quota is None:
            r.problems.append(
                f'{r.key("quota")} is missing: a shrink rule needs the reduced quota, e.g. "1MB"'
            )
        elif quota <= 0:
            r.error("quota", quota, "a size above zero")
        if idle is None:
            r.problems.append(
                f"{r.key('idle')} is missing: a shrink rule needs an idle time "
                '(e.g. "90d"); without one it would shrink every mailbox'
            )
        if r.has("max_size"):
            r.error("max_size", r.table["max_size"], 'no max_size for action "shrink" (use quota)')
        if age is not None:
            r.error(
                "age",
                r.table["age"],
                'no age for action "shrink" (it deletes oldest first until the mailbox fits)',
            )
    elif action == "trim":
        if max_size is None:
            r.problems.append(
                f"{r.key('max_size')} is missing: a trim rule needs the size to "
                'trim down to, e.g. "500MB"'
            )
        if r.has("quota"):
            r.error("quota", r.table["quota"], 'no quota for action "trim" (use max_size)')
    if idle is not None and idle <= 0:
        r.error("idle", idle, 'a positive duration such as "60d"')
    if age is not None and age <= 0 and action == "delete":
        r.error("age", age, 'a positive duration such as "7d"')
    rule = RetentionRule(
        name=name,
        action=action,
        folders=folders,
        exclude_folders=exclude,
        mailboxes=mailboxes,
        users=users,
        idle=idle,
        age=age,
        age_by=age_by,
        quota=quota,
        max_size=max_size,
        schedule=schedule,
        cron=cron,
        enabled=enabled,
    )
    r.unknown()
    return rule


def parse_retention(r: Reader) -> RetentionConfig:
    """Parse [retention]; an absent section means retention is off."""
    if not r.table:
        return RetentionConfig(enabled=False)
    daily_at = r.str("daily_at", "03:00")
    if not re.match(r"^([01]?\d|2[0-3]):[0-5]\d$", daily_at):
        r.error("daily_at", daily_at, 'a time of day "HH:MM", e.g. "03:17"')
        daily_at = "03:00"
    names: set[str] = set()
    rules = tuple(_parse_rule(rr, daily_at, names) for rr in r.tables("rules"))
    store = _parse_store(r.table_of("store"), required=bool(rules))
    cfg = RetentionConfig(
        enabled=r.bool("enabled", True),
        rules=rules,
        store=store,
        access=_parse_access(r.table_of("access")),
        quota=_parse_quota(r.table_of("quota")),
        daily_at=daily_at,
        keep_records=r.duration("keep_records", "180d"),
        lock_timeout=r.duration("lock_timeout", "30s", positive=True),
        config_dir=".",
    )
    if any(rule.mailboxes in ("root", "other") for rule in rules) and not (
        store.root_mailboxes or store.root_mailboxes_file
    ):
        r.problems.append(
            f"{r.key('store.root_mailboxes')} is missing: a rule selects "
            'mailboxes = "root" or "other"; list the root mailboxes '
            "(root_mailboxes or root_mailboxes_file)"
        )
    if any(rule.action == "shrink" for rule in rules) and not (
        cfg.quota.maildirsize or cfg.quota.dovecot_userdb
    ):
        r.problems.append(
            f"{r.key('quota')}: a shrink rule needs somewhere to write the quota: "
            "maildirsize = true and/or dovecot_userdb = PATH"
        )
    r.unknown()
    return cfg


def bind_config_dir(cfg: RetentionConfig, config_path: str) -> RetentionConfig:
    """Attach the directory of policies.toml so relative paths resolve against it."""
    from dataclasses import replace

    return replace(cfg, config_dir=str(Path(config_path).resolve().parent))


def retention_of(config) -> RetentionConfig:
    """The [retention] settings of a loaded maild Config (disabled if absent)."""
    from dataclasses import replace

    from maild.store.base import resolve_state_path

    cfg = getattr(config, "sections", {}).get("retention")
    if not isinstance(cfg, RetentionConfig):
        return RetentionConfig(enabled=False)
    cfg = bind_config_dir(cfg, config.path)
    if not cfg.store.lock_dir:
        state = resolve_state_path(config.server.state, config.path)
        cfg = replace(
            cfg, store=replace(cfg.store, lock_dir=str(Path(state).parent / "retention-locks"))
        )
    return cfg
