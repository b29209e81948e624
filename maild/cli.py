"""The `maild` command line (click).

Exit codes: 0 success; 1 the command ran and found a problem; 2 bad usage or a broken
policies.toml. Errors are one readable message, never a traceback.
"""

from __future__ import annotations

import sys
import time

import click

from maild import __version__, components
from maild.clitools import (
    DEFAULT_CONFIG,
    config_option,
    echo_json,
    load_config,
    open_store,
    parse_since,
    run_async,
    wiring,
)

# The shared helpers live in maild.clitools; command modules import them from there.
__all__ = ["config_option", "echo_json", "load_config", "main", "parse_since", "run_async"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "obj": components.WIRING})
@click.option(
    "-c",
    "--config",
    default=DEFAULT_CONFIG,
    metavar="FILE",
    show_default=True,
    help="policies.toml to use ($MAILD_CONFIG overrides the default).",
)
@click.version_option(__version__, prog_name="maild")
def main(config: str) -> None:
    """maild: a mail-server hygiene daemon in front of Postfix.

    It enforces the provider's acceptable-use policy on mail (relay protection,
    postmaster acceptance, rate limits, forged headers, list consent) and runs the
    retention jobs on the mail store. Configuration: policies.toml.
    """
    from maild import log as mlog

    # What a command changes (a block, a reset) is logged like the daemon's own
    # decisions: to syslog, or to stderr where there is no syslog.
    mlog.setup("syslog", quiet=True)


@main.command()
@config_option
@click.option(
    "--log",
    "log_target",
    default="syslog",
    show_default=True,
    metavar="TARGET",
    help="Where log lines go: syslog (facility mail, ident maild), stderr, or a file.",
)
@click.option("--debug", is_flag=True, help="Log debug detail too.")
@click.option(
    "--allow-root",
    is_flag=True,
    help="Keep running as root when [server] user is "
    "not set (containers, tests). Never needed under systemd.",
)
@click.option(
    "--init-state",
    is_flag=True,
    help="Start even if the SQLite state file is "
    "empty, damaged or not maild's: move it aside (*.refused-TIME) and begin an "
    "empty state, without sanctions or consent ledger. Use once, not in the unit.",
)
def serve(log_target: str, debug: bool, allow_root: bool, init_state: bool) -> None:
    """Run the SMTP proxy and the scheduled jobs in the foreground.

    SIGHUP reloads policies.toml without dropping sessions; SIGTERM stops gracefully.
    Under systemd (Type=notify) readiness and reloads are reported to systemd.
    """
    import logging

    from maild import log as mlog
    from maild.serving import serve as run_serve

    config = load_config()
    mlog.setup(log_target, logging.DEBUG if debug else logging.INFO)
    from maild.customers.sources import SourceError
    from maild.privs import PrivilegeError
    from maild.smtp.front import BindError
    from maild.smtp.tls import TLSConfigError
    from maild.store.base import StoreError

    try:
        run_serve(config, wiring(), allow_root=allow_root, init_state=init_state)
    except (PrivilegeError, TLSConfigError) as e:
        click.echo(f"maild: {e}", err=True)
        sys.exit(2)
    except (StoreError, SourceError) as e:
        # systemd's Restart= retries; the operator reads one line, not a traceback.
        click.echo(f"maild: {e}", err=True)
        sys.exit(1)
    except BindError as e:
        raise click.ClickException(str(e.strerror)) from None
    except OSError as e:
        raise click.ClickException(f"cannot serve: {e.strerror or e}") from None
    except KeyboardInterrupt:
        pass


@main.command("check-config")
@config_option
@click.option("-q", "--quiet", is_flag=True, help="Print nothing when the file is valid.")
def check_config(quiet: bool) -> None:
    """Validate policies.toml (and read its [customer_source]): exit 0, or list every
    problem and exit 2 (1 when only customer files or rows are bad)."""
    from maild.policy.customer import index as customer_index

    config = load_config()
    idx = customer_index(config)
    for line in idx.refused:
        click.echo(f"{config.path}: [customer_source]: {line}", err=True)
    if config.server.tls.enabled:
        from maild.smtp.tls import TLSConfigError, build_context

        try:
            build_context(config.server.tls)
        except TLSConfigError as e:
            click.echo(f"{config.path}: {e}", err=True)
            sys.exit(2)
    if not quiet:
        s = config.server
        counts = " ".join(f"{k}={v}" for k, v in idx.counts().items() if k != "policies.toml")
        click.echo(
            f"{config.path}: OK: mode={s.mode} listen={s.listen[0]}:{s.listen[1]} "
            f"downstream={s.downstream[0]}:{s.downstream[1]} customers={len(idx.customers)}"
            + (f" ({counts})" if counts else "")
            + f" hosted={len(config.hosted_domains)}"
        )
    if idx.refused:
        sys.exit(1)


@main.command("log")
@config_option
@click.option("--since", metavar="DURATION", help="Only decisions newer than this (e.g. 1h, 7d).")
@click.option(
    "-n",
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(1, 100000),
    help="At most this many decisions.",
)
@click.option("--customer", metavar="NAME", help="Only this customer's decisions ('-' for none).")
@click.option(
    "--action",
    type=click.Choice(["relay", "reject", "tempfail"]),
    help="Only decisions with this outcome.",
)
@click.option("--rule", metavar="NAME", help="Only decisions made by this rule (e.g. relay).")
@click.option("--address", metavar="ADDR", help="Only mail from or to this address.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def log_cmd(
    since: str | None,
    limit: int,
    customer: str | None,
    action: str | None,
    rule: str | None,
    address: str | None,
    as_json: bool,
) -> None:
    """Show recent decisions from the state store, newest first."""
    from maild.store.core import recent_decisions

    config = load_config()
    since_ts = parse_since(since)

    async def fetch() -> tuple[list[dict], bool]:
        """The matching rows, and whether the customer asked for has any decision at all."""
        store = await open_store(config)
        try:
            rows = await recent_decisions(
                store,
                since=since_ts,
                limit=limit,
                customer=customer,
                action=action,
                rule=rule,
                address=address,
            )
            seen = (
                bool(rows)
                or not customer
                or bool(await recent_decisions(store, limit=1, customer=customer))
            )
            return rows, seen
        finally:
            await store.close()

    rows, seen = run_async(fetch())
    if not seen and customer != "-" and config.customer(customer or "") is None:
        from maild.antispam.cli import known_customers

        known = known_customers(config)
        raise click.BadParameter(
            f"unknown customer {customer} (known: {known}; '-' for mail of "
            f"no customer): not in {config.path}, never in the decision log",
            param_hint="--customer",
        )
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["ts"]))
        click.echo(
            f"{when} {r['session']}: {r['action']}: {r['stage']} from "
            f"{r['client_name']}[{r['client_addr']}]: {r['code']} {r['status']} "
            f"{r['reason']}; customer={r['customer']} from=<{r['sender']}> "
            f"to=<{r['recipient']}> rule={r['rule']}"
        )
    if not rows and not seen:
        click.echo(f"customer {customer} has no decisions in the state store", err=True)
    elif not rows:
        click.echo(
            f"no decisions of customer {customer} match" if customer else "no decisions match",
            err=True,
        )


def _add_commands(group: click.Group) -> None:
    """The components' commands (maild.components lists them), each with -c FILE."""
    for cmd in components.COMMANDS:
        group.add_command(cmd)
    for parent, cmd in components.SUBCOMMANDS:
        sub = group.commands[parent]
        assert isinstance(sub, click.Group)
        sub.add_command(cmd)
    _add_config_option(group)


def _add_config_option(group: click.Group) -> None:
    for cmd in group.commands.values():
        if isinstance(cmd, click.Group):
            _add_config_option(cmd)
        elif not any("-c" in getattr(p, "opts", ()) for p in cmd.params):
            config_option(cmd)  # on a Command, click.option appends to cmd.params


_add_commands(main)
