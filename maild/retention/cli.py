"""`maild retention ...`, `maild mailbox show`, `maild access ...`.

Every command loads policies.toml (exit 2 naming every problem if it is wrong), opens
maild's store, and answers bad input with a one-line error, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import click

from maild.clitools import config_option_with, load_config, open_store
from maild.config import Config
from maild.retention.config import RetentionConfig, retention_of
from maild.store.base import Store, StoreError

T = TypeVar("T")


# `-c FILE` after the subcommand too (`maild retention run -c policies.toml`).
config_option = config_option_with("policies.toml to use.")


def _load(ctx: click.Context) -> tuple[Config, RetentionConfig]:
    """Load policies.toml, or exit 2 naming every problem."""
    config = load_config(ctx)
    return config, retention_of(config)


def _need_enabled(cfg: RetentionConfig, config: Config) -> None:
    if not cfg.enabled:
        raise click.ClickException(
            f"retention is off: {config.path} has no [retention] section (or enabled = false)"
        )


def _with_store(config: Config, fn: Callable[[Store], Awaitable[T]]) -> T:
    """Open maild's store, run fn(store), close it; store errors become one line."""

    async def main() -> T:
        try:
            store = await open_store(config)
        except StoreError as e:
            raise click.ClickException(str(e)) from None
        try:
            return await fn(store)
        except StoreError as e:
            raise click.ClickException(str(e)) from None
        finally:
            await store.close()

    return asyncio.run(main())


def _is_terminal() -> bool:
    return sys.stderr.isatty()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def parse_time(value: str) -> float:
    """A Unix time, or an ISO 8601 date/time (local time if no zone is given)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: expected a Unix time or a date such as 2024-05-01 or 2024-05-01T12:00:00"
        ) from None


# --------------------------------------------------------------------------- retention


@click.group("retention")
def retention_group() -> None:
    """Retention jobs on the mail store (Trash, idle mailboxes, idle root quotas)."""


@retention_group.command("run")
@click.argument("rule", required=False)
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; change nothing.")
@click.option("--user", "user", metavar="USER", help="Only this mailbox.")
@click.option("--json", "as_json", is_flag=True, help="Dry-run lines as JSON objects.")
@config_option
@click.pass_context
def run_cmd(
    ctx: click.Context, rule: str | None, dry_run: bool, user: str | None, as_json: bool
) -> None:
    """Run RULE now (every enabled rule if none is given)."""
    from maild.retention.jobs import RunBusy, RunError, Runner
    from maild.retention.mailboxes import normalize_user

    config, cfg = _load(ctx)
    _need_enabled(cfg, config)
    if rule is not None and cfg.rule(rule) is None:
        known = ", ".join(r.name for r in cfg.rules) or "none"
        raise click.UsageError(f"no retention rule named {rule!r} (rules: {known})")
    names = [rule] if rule else [r.name for r in cfg.rules if r.enabled]
    if user is not None:
        user = normalize_user(user)
    tty = _is_terminal()

    def emit(ev: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(ev, ensure_ascii=False))
        elif ev["action"] == "delete":
            click.echo(
                f"would-delete\t{ev['rule']}\t{ev['user']}\t{ev['folder']}\t{ev['file']}\t{ev['size']}"
            )
        else:
            click.echo(
                f"would-shrink\t{ev['rule']}\t{ev['user']}\tquota={ev['quota']}\t"
                f"original={ev['original']}\tusage={ev['usage']}"
            )

    async def go(store: Any) -> int:
        runner = Runner(cfg, store)
        failed = 0
        for name in names:
            bar: Any = None

            def progress(done: int, total: int, _name: str = name) -> None:
                nonlocal bar
                if bar is None:
                    bar = click.progressbar(length=total, label=f"{_name}", file=sys.stderr)
                    bar.__enter__()
                bar.update(done - bar.pos)

            try:
                rep = await runner.run(
                    name,
                    dry_run=dry_run,
                    user=user,
                    trigger="cli",
                    on_progress=progress if tty else None,
                    on_plan=emit if dry_run else None,
                )
            except (RunBusy, RunError) as e:
                click.echo(f"maild: {e}", err=True)
                failed += 1
                continue
            finally:
                if bar is not None:
                    bar.__exit__(None, None, None)
            verb = "would delete" if dry_run else "deleted"
            click.echo(
                f"rule {rep.rule}: {rep.status}, {rep.mailboxes} mailboxes, "
                f"{rep.scanned} files scanned, {verb} {rep.deleted} ({rep.bytes} bytes)"
                + (f", shrunk {rep.shrunk}" if rep.shrunk else "")
                + (f", restored {rep.restored}" if rep.restored else "")
                + (f", vanished {rep.vanished}" if rep.vanished else "")
                + (f", skipped {rep.skipped}" if rep.skipped else "")
                + (f", errors {rep.errors}" if rep.errors else "")
                + f" in {rep.seconds:.1f} s",
                err=True,
            )
            failed += rep.errors > 0 or rep.status != "done"
        return failed

    if _with_store(config, go):
        raise SystemExit(1)


@retention_group.command("status")
@click.option("--json", "as_json", is_flag=True)
@config_option
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Rules, their next runs and the figures of their last runs."""
    from maild.retention.show import status_info

    config, cfg = _load(ctx)
    info = _with_store(config, lambda store: status_info(cfg, store))
    if as_json:
        click.echo(json.dumps(info, indent=2, ensure_ascii=False))
        return
    click.echo(
        f"retention: {'on' if cfg.enabled else 'off'}; mailboxes known "
        f"{info['mailboxes_known']}, shrunk {info['mailboxes_shrunk']}, pending deletions "
        f"{info['pending_deletions']}"
    )
    for r in info["rules"]:
        last = r["last_run"]
        click.echo(
            f"  {r['rule']}: {r['action']}, schedule {r['schedule']}"
            f"{'' if r['enabled'] else ' (disabled)'}, next run {_when(r['next_run'])}"
        )
        if last:
            click.echo(
                f"    last run {_when(last['started'])} ({last['trigger']}): {last['status']}, "
                f"{last['mailboxes']} mailboxes, {last['scanned']} files scanned, "
                f"deleted {last['deleted']} ({last['bytes']} bytes), shrunk {last['shrunk']}, "
                f"restored {last['restored']}, skipped {last['skipped']}, errors {last['errors']}"
            )
        else:
            click.echo("    never run")
    for s in info["access_sources"]:
        click.echo(
            f"  access source {s['source']}: read up to {s['offset'] or s['cursor'] or 0}, "
            f"updated {_when(s['updated'])}"
        )


@retention_group.command("deletions")
@click.option("--user", "user", metavar="USER")
@click.option("--rule", "rule", metavar="RULE")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100000))
@click.option("--json", "as_json", is_flag=True)
@config_option
@click.pass_context
def deletions_cmd(
    ctx: click.Context, user: str | None, rule: str | None, limit: int, as_json: bool
) -> None:
    """The record of deleted files, newest first."""
    from maild.retention import state
    from maild.retention.mailboxes import normalize_user

    config, _cfg = _load(ctx)
    rows = _with_store(
        config,
        lambda store: state.deletions(
            store, user=normalize_user(user) if user else None, rule=rule, limit=limit
        ),
    )
    for r in rows:
        if as_json:
            click.echo(json.dumps(r, ensure_ascii=False))
        else:
            click.echo(
                f"{_when(r['ts'])}\t{r['rule']}\t{r['user']}\t{r['folder']}\t{r['name']}\t"
                f"{r['size']}\t{r['status']}"
            )


# --------------------------------------------------------------------------- mailbox


@click.group("mailbox")
def mailbox_group() -> None:
    """Look at one mailbox as retention sees it."""


@mailbox_group.command("show")
@click.argument("user")
@click.option("--files", is_flag=True, help="List the files the next runs would delete.")
@click.option("--dovecot", is_flag=True, help="Also ask Dovecot (doveadm) what it enforces.")
@click.option("--json", "as_json", is_flag=True)
@config_option
@click.pass_context
def show_cmd(ctx: click.Context, user: str, files: bool, dovecot: bool, as_json: bool) -> None:
    """Last access, quota, original quota, usage by folder, what the next runs would delete."""
    from maild.retention.jobs import RunError
    from maild.retention.mailboxes import normalize_user
    from maild.retention.show import mailbox_info

    config, cfg = _load(ctx)
    _need_enabled(cfg, config)
    user = normalize_user(user)

    async def go(store: Any) -> dict[str, Any]:
        try:
            return await mailbox_info(cfg, store, user, dovecot=dovecot)
        except RunError as e:
            raise click.UsageError(str(e)) from None

    info = _with_store(config, go)
    if as_json:
        if not files:
            for n in info.get("next", []):
                n.pop("files", None)
        click.echo(json.dumps(info, indent=2, ensure_ascii=False))
        return
    click.echo(
        f"mailbox {info['user']}  {info['path']}{'' if info['exists'] else '  (no such directory)'}"
    )
    if info["known"]:
        click.echo(f"  first seen   {_when(info['first_seen'])}")
        click.echo(
            f"  last access  {_when(info['last_access'])}"
            f"{' (' + info['access_source'] + ')' if info['access_source'] else ''}"
            f"; idle {info['idle_days']} days"
        )
    else:
        click.echo("  not seen by maild yet: its idle clock starts at the first run that sees it")
    md = info.get("maildirsize")
    click.echo(
        f"  quota        {md['limit'] if md and 'limit' in md else 'no maildirsize'}"
        + (
            f", usage {md['usage_bytes']} bytes / {md['usage_count']} messages"
            if md and "limit" in md
            else ""
        )
    )
    click.echo(
        f"  quota state  {info['quota_state']}"
        + (f", original {info['original_quota']}" if info.get("original_quota") else "")
        + (
            f", shrunk {_when(info['shrunk_at'])} by {info['shrunk_rule']}"
            if info.get("shrunk_at")
            else ""
        )
    )
    if info.get("dovecot_userdb_limit") is not None:
        click.echo(f"  dovecot userdb override  *:bytes={info['dovecot_userdb_limit']}")
    if "dovecot" in info:
        dv = info["dovecot"]
        if "error" in dv:
            click.echo(f"  dovecot      cannot ask doveadm: {dv['error']}")
        else:
            click.echo(
                f"  dovecot      enforces {dv.get('storage_limit_kb', '?')} kB, uses "
                f"{dv.get('storage_used_kb', '?')} kB; quota_rule "
                f"{dv.get('quota_rule') or '(none: limit from maildirsize)'}"
            )
    if info["exists"]:
        click.echo(f"  usage        {info['usage_bytes']} bytes counted by the quota")
        for f in info["folders"]:
            click.echo(
                f"    {f['folder']:<30} {f['messages']:>8} messages {f['bytes']:>12} bytes"
                + ("" if f["quota_counted"] else "  (not counted)")
            )
        for n in info["next"]:
            if "error" in n:
                click.echo(f"  rule {n['rule']}: {n['error']}")
                continue
            when = _when(n["at"]) if n["scheduled"] else "manual run now"
            line = f"  rule {n['rule']} at {when}: would delete {n['delete']} ({n['bytes']} bytes)"
            if "shrink_to" in n:
                line += f", set quota {n['shrink_to']}"
            click.echo(line)
            if files:
                for p in n["files"]:
                    click.echo(f"    {p['folder']}\t{p['file']}\t{p['size']}")


# --------------------------------------------------------------------------- access


@click.group("access")
def access_group() -> None:
    """Last POP/IMAP access per mailbox, as maild records it."""


@access_group.command("touch")
@click.argument("user")
@click.option("--at", "at", metavar="TIME", help="When (Unix time or ISO date); default now.")
@config_option
@click.pass_context
def touch_cmd(ctx: click.Context, user: str, at: str | None) -> None:
    """Record an access to USER's mailbox (restores a shrunk quota)."""
    from maild.retention.jobs import Runner
    from maild.retention.mailboxes import normalize_user, safe_user

    config, cfg = _load(ctx)
    user = normalize_user(user)
    if not safe_user(user):
        raise click.UsageError(f"{user!r} is not a usable user name")
    ts = parse_time(at) if at else time.time()
    if ts > time.time() + 60:
        raise click.BadParameter("the time is in the future", param_hint="--at")

    async def go(store: Any) -> None:
        await Runner(cfg, store).on_access([(user, ts, "touch")])

    _with_store(config, go)
    click.echo(f"access recorded: {user} at {_when(ts)}")


@access_group.command("import")
@click.option(
    "--dict",
    "dict_path",
    metavar="PATH",
    help="Dovecot last_login file dict (default: [retention.access] last_login_dict).",
)
@click.option("--tsv", "tsv_path", metavar="PATH", help="Lines 'user unix-time'.")
@config_option
@click.pass_context
def import_cmd(ctx: click.Context, dict_path: str | None, tsv_path: str | None) -> None:
    """Import last-login times (Dovecot's last_login dict, or a 'user time' list)."""
    from maild.retention.access import parse_dict_file, parse_tsv
    from maild.retention.jobs import Runner

    config, cfg = _load(ctx)
    if not dict_path and not tsv_path:
        dict_path = cfg.resolve(cfg.access.last_login_dict) if cfg.access.last_login_dict else None
    if not dict_path and not tsv_path:
        raise click.UsageError(
            "give --dict PATH or --tsv PATH (or set last_login_dict in [retention.access])"
        )
    rows: list[tuple[str, float, str]] = []
    now = time.time()
    for path, parser in (
        (dict_path, lambda t: parse_dict_file(t, cfg.access.last_login_key_prefix, now)),
        (tsv_path, lambda t: parse_tsv(t, now)),
    ):
        if not path:
            continue
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                rows += parser(f.read())
        except OSError as e:
            raise click.ClickException(f"cannot read {path}: {e.strerror}") from None

    async def go(store: Any) -> None:
        await Runner(cfg, store).on_access(rows)

    _with_store(config, go)
    click.echo(f"imported {len(rows)} access times")


@access_group.command("poll")
@config_option
@click.pass_context
def poll_cmd(ctx: click.Context) -> None:
    """Read the Dovecot log once, from where maild stopped, to its end."""
    from maild.retention.access import FileFollower, JournalFollower
    from maild.retention.jobs import Runner

    config, cfg = _load(ctx)
    source = cfg.access.dovecot_log
    if not source:
        raise click.UsageError("no dovecot_log in [retention.access]")

    async def go(store: Any) -> int:
        runner = Runner(cfg, store)
        if source == "journal":
            return await JournalFollower(cfg.access.journal_match, store).run(
                runner.on_access, follow=False
            )
        return await FileFollower(cfg.resolve(source), store).poll(runner.on_access)

    try:
        n = _with_store(config, go)
    except OSError as e:
        raise click.ClickException(f"cannot read the Dovecot log: {e}") from None
    click.echo(f"{n} logins read")


@access_group.command("list")
@click.option("--idle-over", "idle_over", metavar="DURATION", help='e.g. "60d"')
@click.option("--json", "as_json", is_flag=True)
@config_option
@click.pass_context
def list_cmd(ctx: click.Context, idle_over: str | None, as_json: bool) -> None:
    """Known mailboxes with their last access, most idle first."""
    from maild.config import parse_duration
    from maild.retention import state

    config, _cfg = _load(ctx)
    limit = None
    if idle_over:
        try:
            limit = parse_duration(idle_over)
        except ValueError:
            raise click.BadParameter(
                f"{idle_over!r}: expected a duration such as 60d", param_hint="--idle-over"
            ) from None
    rows = _with_store(config, lambda store: state.mailboxes(store))
    now = time.time()
    out = sorted(rows.values(), key=lambda r: r.idle_since)
    for r in out:
        idle = now - r.idle_since
        if limit is not None and idle <= limit:
            continue
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "user": r.user,
                        "first_seen": r.first_seen,
                        "last_access": r.last_access,
                        "source": r.access_source,
                        "idle_days": round(idle / 86400, 1),
                        "quota_state": r.quota_state,
                    }
                )
            )
        else:
            click.echo(
                f"{r.user}\t{_when(r.last_access)}\t{r.access_source or '-'}\t"
                f"idle {idle / 86400:.1f} d\t{r.quota_state}"
            )
