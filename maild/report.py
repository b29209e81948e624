"""`maild report`: what maild did in a period, from the state store.

Figures come from the decision log (one row per decision, see maild/store/core.py),
the sanction history, and the sections of other components that maild.components
lists (the retention jobs add their deletions and quota changes). Plain text for a human, JSON
for scripts, and mailed to postmaster daily when `[report] mail = true`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, localtime
from typing import TYPE_CHECKING, Any

from maild.config import Config, Reader
from maild.customers.index import origin_kind
from maild.store.base import Store

if TYPE_CHECKING:
    from maild.daemon import Daemon
    from maild.smtp.downstream import Downstream

log = logging.getLogger("maild.report")


@dataclass(frozen=True)
class ReportConfig:
    mail: bool = False
    at: tuple[int, int] = (6, 0)
    period: float = 86400.0
    to: tuple[str, ...] = ()  # default: postmaster@ the first hosted domain


def parse_report(r: Reader) -> ReportConfig:
    d = ReportConfig()
    at = r.str("at", "06:00")
    m = re.match(r"^([01]?\d|2[0-3]):([0-5]\d)$", at)
    if not m:
        r.error("at", at, 'a time of day HH:MM, e.g. "06:00"')
    cfg = ReportConfig(
        mail=r.bool("mail", d.mail),
        at=(int(m.group(1)), int(m.group(2))) if m else d.at,
        period=r.duration("period", "24h", positive=True),
        to=r.str_list("to"),
    )
    for i, a in enumerate(cfg.to):
        if "@" not in a:
            r.error(f"to[{i}]", a, 'an email address such as "postmaster@example.net"')
    r.unknown()
    return cfg


# A component's section: async fn(store, since, until) -> (title, data dict) or None.
ReportSection = Callable[[Store, float, float], Awaitable[tuple[str, dict] | None]]


async def build(
    store: Store,
    config: Config,
    since: float,
    until: float | None = None,
    *,
    sections: Sequence[ReportSection] = (),
) -> dict:
    until = until or time.time()
    span = (since, until)

    async def rows(sql: str) -> list[tuple]:
        return await store.fetchall(sql, span)

    relayed = await rows(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM decisions WHERE action = 'relay' "
        "AND ts >= ? AND ts < ?"
    )
    refused = await rows(
        "SELECT rule, action, COUNT(*) FROM decisions WHERE action != 'relay' "
        "AND ts >= ? AND ts < ? GROUP BY rule, action ORDER BY COUNT(*) DESC"
    )
    customers = await rows(
        "SELECT customer, SUM(CASE WHEN action = 'relay' THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN action = 'reject' THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN action = 'tempfail' THEN 1 ELSE 0 END) FROM decisions "
        "WHERE ts >= ? AND ts < ? GROUP BY customer "
        "ORDER BY SUM(CASE WHEN action = 'relay' THEN 1 ELSE 0 END) DESC"
    )
    senders = await rows(
        "SELECT customer, sender, COUNT(*), SUM(CASE WHEN recipient = '' THEN 0 ELSE "
        "LENGTH(recipient) - LENGTH(REPLACE(recipient, ',', '')) + 1 END) "
        "FROM decisions WHERE action = 'relay' AND ts >= ? AND ts < ? "
        "GROUP BY customer, sender ORDER BY COUNT(*) DESC LIMIT 10"
    )
    sanctions = await rows(
        "SELECT ts, customer, action, reason, actor FROM sanction_events "
        "WHERE action IN ('warn', 'block', 'unblock') AND ts >= ? AND ts < ? "
        "ORDER BY id"
    )
    optin = await rows(
        "SELECT COUNT(*) FROM decisions WHERE action = 'reject' AND rule LIKE 'optin%' "
        "AND ts >= ? AND ts < ?"
    )
    report: dict[str, Any] = {
        "since": since,
        "until": until,
        "hostname": config.server.hostname,
        "relayed": {"messages": relayed[0][0], "bytes": relayed[0][1]},
        "refused": [{"rule": r, "action": a, "count": n} for r, a, n in refused],
        "customers": [
            {
                "customer": c,
                "source": _source(config, c),
                "relayed": int(a or 0),
                "rejected": int(b or 0),
                "tempfailed": int(t or 0),
            }
            for c, a, b, t in customers
        ],
        "top_senders": [
            {"customer": c, "sender": s, "messages": n, "recipients": int(r or 0)}
            for c, s, n, r in senders
        ],
        "sanctions": [
            {"ts": ts, "customer": c, "action": a, "reason": r, "actor": who}
            for ts, c, a, r, who in sanctions
        ],
        "list_mail_refused_no_consent": optin[0][0],
    }
    for section in sections:
        got = await section(store, since, until)
        if got is not None:
            report[got[0]] = got[1]
    return report


def _source(config: Config, name: str) -> str:
    """Where the customer comes from now: policies.toml, files, postgresql, or "-"."""
    c = config.customer(name) if name and name != "-" else None
    return origin_kind(c.origin) if c is not None else "-"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def as_text(rep: dict) -> str:
    out = [
        f"maild report for {rep['hostname']}: {_when(rep['since'])} to {_when(rep['until'])}",
        "",
    ]
    r = rep["relayed"]
    out.append(f"Relayed: {r['messages']} messages, {r['bytes']} bytes")
    out.append(
        f"Refused: {sum(x['count'] for x in rep['refused'] if x['action'] == 'reject')} "
        f"(rejected), {sum(x['count'] for x in rep['refused'] if x['action'] == 'tempfail')} "
        "(tempfailed)"
    )
    for x in rep["refused"]:
        out.append(f"  {x['rule']:28} {x['action']:9} {x['count']}")
    out += ["", "Per customer (relayed / rejected / tempfailed; from):"]
    for c in rep["customers"]:
        out.append(
            f"  {c['customer']:28} {c['relayed']} / {c['rejected']} / {c['tempfailed']}"
            f"; {c.get('source', '-')}"
        )
    out += ["", "Top senders (messages, recipients):"]
    for s in rep["top_senders"]:
        out.append(
            f"  {s['customer']:16} <{s['sender']}> {s['messages']} msgs, {s['recipients']} rcpts"
        )
    out += ["", "Warnings and blocks:"]
    if not rep["sanctions"]:
        out.append("  none")
    for s in rep["sanctions"]:
        out.append(
            f"  {_when(s['ts'])} {s['customer']}: {s['action']} ({s['reason']}) by {s['actor']}"
        )
    out += ["", f"List mail refused for missing consent: {rep['list_mail_refused_no_consent']}"]
    for key, val in rep.items():
        if key in (
            "since",
            "until",
            "hostname",
            "relayed",
            "refused",
            "customers",
            "top_senders",
            "sanctions",
            "list_mail_refused_no_consent",
        ) or not isinstance(val, dict | list):
            continue
        out += ["", f"{key.replace('_', ' ').capitalize()}:"]
        for k, v in val.items() if isinstance(val, dict) else enumerate(val):
            out.append(f"  {k}: {v}")
    return "\n".join(out) + "\n"


def recipients(config: Config) -> list[str]:
    rc = config.sections.get("report") or ReportConfig()
    if rc.to:
        return list(rc.to)
    domain = (
        config.postmaster.domains or config.postmaster.hostnames or (config.server.hostname,)
    )[0]
    return [f"postmaster@{domain}"]


def compose(config: Config, rep: dict) -> EmailMessage:
    msg = EmailMessage()
    rcpts = recipients(config)
    msg["From"] = f"maild <{rcpts[0]}>"
    msg["To"] = ", ".join(rcpts)
    msg["Subject"] = (
        f"[maild] Daily report for {config.server.hostname}: {rep['relayed']['messages']} relayed"
    )
    msg["Date"] = format_datetime(localtime())
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(as_text(rep))
    return msg


async def send(downstream: Downstream, config: Config, rep: dict) -> bool:
    from maild.smtp.submit import as_bytes, submit

    reply, took = await submit(
        downstream, "", recipients(config), as_bytes(compose(config, rep)), what="report"
    )
    if took:
        log.info("report: mailed to=%s", ",".join(took))
    return bool(took)


async def mail_report(daemon: Daemon) -> None:
    """The scheduled job: the last period's report, mailed to postmaster."""
    rc = daemon.config.sections.get("report") or ReportConfig()
    now = time.time()
    await daemon.decisions.flush()
    rep = await build(
        daemon.store, daemon.config, now - rc.period, now, sections=daemon.wiring.report_sections
    )
    await send(daemon.downstream, daemon.config, rep)
