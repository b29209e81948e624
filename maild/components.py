"""The composition root: every component of maild, listed once.

A component module exports plain data (its section parser, its keys in [[customers]],
its schema migrations, its commands, its doctor checks, its report section, the modules
to load before root is dropped) and this module puts them together. Nothing registers
itself on import: config.parse() and the store are handed what they need, and the CLI,
the doctor, the report and privs read their lists from here. Adding a component is one
entry in COMPONENTS.

The order of COMPONENTS is the order in which policies.toml's sections are parsed, so
it is the order of the problems `maild check-config` lists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import click

from maild import config as cfg
from maild import dns, doctor, opscli, report
from maild.antispam import cli as antispam_cli
from maild.antispam import limiter, sanctions
from maild.customers import cli as customers_cli
from maild.customers import ops as customers_ops
from maild.optin import cli as optin_cli
from maild.optin import ledger
from maild.optin import settings as optin_settings
from maild.policy import (
    bulk,
    chain,  # noqa: F401  the order table: its import checks every rule is listed once
    headers,
    headers_cli,
    identity,
    ratelimit,
)
from maild.retention import cli as retention_cli
from maild.retention import config as retention_config
from maild.retention import ops as retention_ops
from maild.retention import state as retention_state
from maild.store import Store, core, leases
from maild.store import cli as store_cli
from maild.store.base import Migrations
from maild.web import cli as web_cli
from maild.web import keys
from maild.web import settings as web_settings
from maild.wiring import Wiring


@dataclass(frozen=True)
class Component:
    name: str
    sections: Mapping[str, cfg.SectionParser] = field(default_factory=dict)
    customer_keys: Mapping[str, cfg.CustomerParser] = field(default_factory=dict)
    migrations: Migrations = field(default_factory=dict)
    commands: Sequence[click.Command] = ()
    # Commands added to a group another component owns, by the group's name.
    subcommands: Mapping[str, Sequence[click.Command]] = field(default_factory=dict)
    doctor_checks: Sequence[doctor.DoctorCheck] = ()
    report_sections: Sequence[report.ReportSection] = ()
    preloads: Sequence[str] = ()


COMPONENTS: tuple[Component, ...] = (
    Component(
        "state",
        migrations={"core": core.MIGRATIONS, "leases": leases.MIGRATIONS},
        commands=(store_cli.migrate_state,),
        preloads=("maild.store.sqlite", "maild.store.core", "maild.textsig", "maild.smtp.submit"),
    ),
    Component(
        "operations",
        commands=(opscli.doctor, opscli.postmaster, opscli.report, opscli.status, opscli.reload),
    ),
    Component(
        "retention",
        sections={"retention": retention_config.parse_retention},
        migrations={"retention": retention_state.MIGRATIONS},
        commands=(
            retention_cli.retention_group,
            retention_cli.mailbox_group,
            retention_cli.access_group,
        ),
        doctor_checks=(retention_ops.doctor_checks,),
        report_sections=(retention_ops.report_section,),
        preloads=(
            "maild.retention.scheduler",
            "maild.retention.jobs",
            "maild.retention.sweep",
            "maild.retention.restore",
        ),
    ),
    Component(
        "antispam",
        sections={"sanctions": sanctions.parse_sanctions},
        migrations={"ratelimit": limiter.MIGRATIONS, "sanctions": sanctions.MIGRATIONS},
        commands=(antispam_cli.customers, antispam_cli.customer, antispam_cli.ratelimit),
        preloads=("maild.antispam.notify",),
    ),
    Component(
        "optin",
        sections={"optin": optin_settings.parse_optin},
        migrations={"optin": ledger.MIGRATIONS},
        commands=(optin_cli.optin,),
        preloads=("maild.optin.service",),
    ),
    Component(
        "web",
        sections={"web": web_settings.parse_web},
        migrations={"web": keys.MIGRATIONS},
        subcommands={"optin": (web_cli.unsubscribe_url_cmd, web_cli.unsubscribe_key_cmd)},
        preloads=web_settings.PRELOAD,
    ),
    Component("bulk", sections={"bulk": bulk.parse_bulk}),
    Component(
        "headers",
        sections={"headers": partial(headers.parse_headers, checks=chain.CHECK_DEFAULTS)},
        customer_keys={
            "headers": partial(headers.parse_customer_headers, checks=chain.CHECK_DEFAULTS)
        },
        commands=(headers_cli.check_message,),
    ),
    Component("identity", customer_keys={"permitted": identity.parse_permitted}),
    Component(
        "customers",
        subcommands={"customers": (customers_cli.import_csv,)},
        doctor_checks=(customers_ops.doctor_checks,),
        preloads=("maild.customers.sources",),
    ),
    Component("dns", sections={"dns": dns.parse_dns}, preloads=("maild.dns",)),
    Component(
        "ratelimit",
        sections={"ratelimit": ratelimit.parse_ratelimit},
        customer_keys={"ratelimit": ratelimit.parse_customer_ratelimit},
    ),
    Component("report", sections={"report": report.parse_report}, preloads=("maild.report",)),
)


def _merged(name: str) -> dict[str, Any]:
    """One mapping from every component's; a key two components claim is a build error."""
    out: dict[str, Any] = {}
    for c in COMPONENTS:
        for key, value in getattr(c, name).items():
            if key in out:
                raise RuntimeError(f"maild.components: {name} {key!r} is claimed twice")
            out[key] = value
    return out


WIRING = Wiring(
    sections=_merged("sections"),
    customer_keys=_merged("customer_keys"),
    migrations=_merged("migrations"),
    doctor_checks=tuple(f for c in COMPONENTS for f in c.doctor_checks),
    report_sections=tuple(f for c in COMPONENTS for f in c.report_sections),
    preloads=tuple(m for c in COMPONENTS for m in c.preloads),
)
COMMANDS: tuple[click.Command, ...] = tuple(cmd for c in COMPONENTS for cmd in c.commands)
SUBCOMMANDS: tuple[tuple[str, click.Command], ...] = tuple(
    (group, cmd) for c in COMPONENTS for group, cmds in c.subcommands.items() for cmd in cmds
)


def parse(data: dict[str, Any], path: str = "policies.toml") -> cfg.Config:
    """policies.toml's decoded document, with every component's sections."""
    return WIRING.parse(data, path)


def load(path: str) -> cfg.Config:
    return WIRING.load(path)


async def open_store(
    state: str,
    config_path: str = ".",
    *,
    migrate: bool = True,
    check: bool = False,
    init: bool = False,
) -> Store:
    """The state store with every component's schema."""
    return await WIRING.open_store(state, config_path, migrate=migrate, check=check, init=init)
