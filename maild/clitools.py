"""What every `maild` command module shares: -c FILE, loading policies.toml, the store.

Exit codes: 0 success; 1 the command ran and found a problem; 2 bad usage or a broken
policies.toml. Errors are one readable message, never a traceback. The components and
their schemas come from the root command's context object (a maild.wiring.Wiring, set
by maild.cli), so a command module imports no other component to read the file.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click

from maild import config as cfg
from maild.store.base import Store, StoreError
from maild.wiring import Wiring

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_CONFIG = os.environ.get("MAILD_CONFIG", "policies.toml")
CONFIG_HELP = "policies.toml to use (default: $MAILD_CONFIG or ./policies.toml)."


def _set_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.find_root().params["config"] = value


def config_option_with(help: str) -> Callable[[F], F]:
    """`-c FILE` accepted after any subcommand too (`maild serve -c policies.toml`)."""
    return click.option(
        "-c",
        "--config",
        "config_",
        metavar="FILE",
        default=None,
        expose_value=False,
        is_eager=True,
        callback=_set_config,
        help=help,
    )


def config_option(f: F) -> F:
    return config_option_with(CONFIG_HELP)(f)


def config_path(ctx: click.Context | None = None) -> str:
    ctx = ctx or click.get_current_context()
    return ctx.find_root().params.get("config") or DEFAULT_CONFIG


def wiring(ctx: click.Context | None = None) -> Wiring:
    obj = (ctx or click.get_current_context()).find_root().obj
    if not isinstance(obj, Wiring):
        raise TypeError("maild commands run under maild.cli.main, which passes the components")
    return obj


def load_config(ctx: click.Context | None = None) -> cfg.Config:
    """Load policies.toml or exit 2 with every problem listed."""
    try:
        return wiring(ctx).load(config_path(ctx))
    except cfg.ConfigError as e:
        click.echo(f"maild: {len(e.problems)} problem(s) in {e.path}:", err=True)
        for p in e.problems:
            click.echo(f"  {p}", err=True)
        sys.exit(2)


async def open_store(config: cfg.Config, **kw: bool) -> Store:
    """The state store of config, with every component's schema."""
    return await wiring().open_store(config.server.state, config.path, **kw)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; a state-store failure is a clean error, not a traceback."""
    try:
        return asyncio.run(coro)
    except StoreError as e:
        raise click.ClickException(str(e)) from None


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def parse_since(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return time.time() - cfg.parse_duration(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: expected a duration such as 30m, 24h or 7d", param_hint="--since"
        ) from None
