"""Operating maild: doctor, postmaster check, report, status, reload."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import click

from maild.clitools import echo_json, load_config, open_store, parse_since, run_async, wiring


@click.command()
@click.option(
    "--postfix-config",
    metavar="DIR",
    help="Postfix configuration directory to read with postconf (default: Postfix's own).",
)
@click.option(
    "--unit", metavar="FILE", help="The systemd unit to check (default: the installed one)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(postfix_config: str | None, unit: str | None, as_json: bool) -> None:
    """Check that this deployment is wired right: one line per check, with the fix.

    Exit code 0 when all is OK, 1 with warnings, 2 with failures.
    """
    from maild import doctor as doc

    config = load_config()
    checks = doc.run_all(config, wiring(), postfix_config=postfix_config, unit=unit)
    if as_json:
        echo_json([c.__dict__ for c in checks])
    else:
        for c in checks:
            click.echo(c.line())
    sys.exit(doc.exit_code(checks))


@click.group()
def postmaster() -> None:
    """Postmaster acceptance (RFC 5321 4.5.1, RFC 2142)."""


@postmaster.command("check")
@click.option(
    "--postfix",
    "postfix_addr",
    metavar="HOST:PORT",
    default=None,
    help="Postfix to probe directly (default: [server] downstream).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def postmaster_check(postfix_addr: str | None, as_json: bool) -> None:
    """Probe postmaster@ and abuse@ every hosted domain, through maild and at Postfix.

    Sends MAIL FROM:<>, RCPT TO for each address, then RSET: nothing is delivered.
    Exit code 1 when any address is refused anywhere.
    """
    from maild.config import parse_hostport
    from maild.probe import probe

    config = load_config()
    try:
        direct = parse_hostport(postfix_addr) if postfix_addr else config.server.downstream
    except ValueError:
        raise click.BadParameter(
            f"{postfix_addr!r}: expected HOST:PORT", param_hint="--postfix"
        ) from None
    listen = config.server.listen
    targets = {"maild": (listen[0] or "127.0.0.1", listen[1]), "postfix": direct}
    domains = list(config.postmaster.domains) + list(config.postmaster.hostnames)
    rcpts = [f"{lp}@{d}" for d in domains for lp in config.postmaster.local_parts]
    results = {
        name: probe(h, p, rcpts, helo=config.server.hostname) for name, (h, p) in targets.items()
    }
    rows: list[dict[str, Any]] = []  # JSON: the address, then {code, reply} per target
    bad = 0
    for d in domains:
        for lp in config.postmaster.local_parts:
            a = f"{lp}@{d}"
            row: dict[str, Any] = {"address": a}
            for name, r in results.items():
                code, text = r.rcpt.get(a, (0, r.error or "not probed"))
                row[name] = {"code": code, "reply": text}
                bad += not (200 <= code < 300)
            rows.append(row)
    if as_json:
        echo_json(rows)
    else:
        for row in rows:
            parts = []
            for name in targets:
                code, text = row[name]["code"], row[name]["reply"]
                parts.append(
                    f"{name}={'OK' if 200 <= code < 300 else 'FAIL'}({code or '-'}"
                    f"{'' if 200 <= code < 300 else ' ' + text[:80]})"
                )
            click.echo(f"{row['address']}: " + " ".join(parts))
    sys.exit(1 if bad else 0)


@click.command()
@click.option(
    "--since",
    default="24h",
    show_default=True,
    metavar="DURATION",
    help="Report on this much of the past (e.g. 1h, 24h, 7d).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--mail",
    "mail",
    is_flag=True,
    help="Also mail the report to postmaster through the downstream.",
)
def report(since: str, as_json: bool, mail: bool) -> None:
    """What maild did: relayed and refused mail per rule and customer, top senders,
    warnings and blocks, list mail refused, retention deletions and quota changes."""
    from maild import report as rep

    config = load_config()
    start = parse_since(since)
    assert start is not None

    async def go() -> dict:
        store = await open_store(config)
        try:
            data = await rep.build(
                store, config, start, time.time(), sections=wiring().report_sections
            )
        finally:
            await store.close()
        if mail:
            from maild.smtp.downstream import Downstream

            host, port = config.server.downstream
            ds = Downstream(
                host,
                port,
                local_hostname=config.server.hostname,
                timeout=config.server.downstream_timeout,
            )
            try:
                data["mailed"] = await rep.send(ds, config, data)
            finally:
                await ds.close()
        return data

    data = run_async(go())
    if as_json:
        echo_json(data)
    else:
        click.echo(rep.as_text(data), nl=False)
    if mail and not data.get("mailed"):
        raise click.ClickException("the report could not be mailed: is the downstream up?")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """The running daemon: uptime, sessions in flight, downstream connections, next jobs.

    Exit code 1 when maild serve is not running.
    """
    from maild.daemonctl import daemon_status

    config = load_config()
    st = daemon_status(config)
    if st is None:
        if as_json:
            echo_json({"running": False})
        else:
            click.echo("maild is not running")
        sys.exit(1)
    st["running"] = True
    st["uptime"] = round(time.time() - st["started"])
    if as_json:
        echo_json(st)
        return
    click.echo(
        f"maild {st['version']} pid {st['pid']}: up {st['uptime']}s, mode {st['mode']}, "
        f"listen {st['listen']} -> {st['downstream']}"
    )
    click.echo(f"  state: {st.get('state', '-')}")
    for line in workers_lines(st):
        click.echo("  " + line)
    for r in st.get("restart_needed", []):
        click.echo(f"  not in effect until a restart: {_pending(r)}")
    click.echo(
        f"  sessions in flight: {st['sessions']}; downstream connections: "
        f"{st['downstream_in_use']} in use, {st['downstream_idle']} idle"
    )
    for line in _limits_lines(st.get("limits")) + _front_lines(st.get("front"), st["mode"]):
        click.echo("  " + line)
    click.echo(
        f"  since start: relayed {st['relayed']}, rejected {st['rejected']}, "
        f"tempfailed {st['tempfailed']}"
    )
    if st["blocked_customers"]:
        click.echo(f"  blocked customers: {', '.join(st['blocked_customers'])}")
    for j in st["jobs"]:
        click.echo(f"  next {j['id']}: {j['next_run'] or '-'}")


@click.command()
def reload() -> None:
    """Reload policies.toml in the running daemon (SIGHUP); sessions are not dropped.

    The file is checked first: a broken file is reported here and not sent. Then the
    command waits for the daemon's answer: listen and downstream changes are applied
    (sessions in flight finish where they started); [server] state and user need a
    restart. Exit code 0 when everything in the file is in effect, 1 otherwise.
    """
    from maild import daemonctl

    config = load_config()  # exits 2 with the problems if the file is broken
    answer = daemonctl.ask(config, signal.SIGHUP, "reload")
    if answer.outcome == "not-running":
        raise click.ClickException(
            "maild is not running (no live status file beside [server] state, no pid_file); "
            "under systemd use `systemctl reload maild`; if you changed [server] state, that "
            "needs `systemctl restart maild`"
        )
    if answer.outcome == "timeout" and answer.status is None:
        raise click.ClickException(
            f"reload sent to maild pid {answer.pid}, but it wrote no status file beside "
            f"[server] state = {config.server.state}: cannot tell what took effect; see its log"
        )
    if answer.signal_error or answer.outcome == "timeout":
        raise click.ClickException(
            answer.signal_error
            or f"maild pid {answer.pid} did not confirm the reload within "
            f"{daemonctl.WAIT:g}s; see its log"
        )
    assert answer.status is not None
    result, st = answer.status["reload"], answer.status
    if result["refused"]:
        raise click.ClickException(
            "the daemon refused the reload and keeps the running "
            "policy: " + "; ".join(result["refused"])
        )
    click.echo(f"reload: maild pid {answer.pid} reloaded {config.path}")
    for key in result["applied"]:
        click.echo(f"  {key} now {st[key]} (sessions in flight finish on the old one)")
    for w in result["warnings"]:
        click.echo(f"  warning: {w}", err=True)
    if st["restart_needed"]:
        for r in st["restart_needed"]:
            click.echo(f"  not in effect until a restart: {_pending(r)}", err=True)
        click.echo("  restart maild to apply them (systemctl restart maild)", err=True)
        sys.exit(1)


def _front_lines(front: dict | None, mode: str) -> list[str]:
    """[server.tls], [server.auth] and trusted_proxies as the daemon runs them (front
    mode's; in before-queue mode Postfix's smtpd does TLS and AUTH)."""
    if front is None:
        return []
    tls, auth = front.get("tls"), front.get("auth")
    if not tls:
        return ["tls: off (no [server.tls] certificate); auth: off"] if mode == "front" else []
    out = [
        f"tls: {tls['certificate']} (subject {tls.get('subject') or '?'}, not after "
        f"{tls.get('not_after') or '?'}), {tls['min_protocol']} or later, listen "
        f"{tls['security_level']}, customers {tls['customers']}"
    ]
    for kind in ("implicit", "submission"):
        if tls[kind]:
            out.append(f"{kind} listeners: {', '.join(tls[kind])}")
    out.append(f"auth: dovecot {auth['dovecot']}" if auth else "auth: off")
    if front.get("trusted_proxies"):
        out.append(f"PROXY protocol from: {', '.join(front['trusted_proxies'])}")
    return out


def _pending(r: dict) -> str:
    """One restart_needed entry of the status file, as `maild status` and `reload` print it."""
    empty = '""'
    why = f": {r['why']}" if r["why"] else ""
    where = r.get("section", "server")
    return f"[{where}] {r['key']} = {r['file'] or empty} (running: {r['running'] or empty}){why}"


def workers_lines(st: dict) -> list[str]:
    """`maild status` and `maild doctor`: the worker processes (maild.workers)."""
    workers = st.get("workers")
    if not workers:
        return ["workers: 1 (one process)"]
    setting = st.get("workers_setting")
    how = " (auto: the CPUs this process may use)" if setting == "auto" else ""
    now = time.time()
    lines = [f"workers: {len(workers)}{how}; limits are the host's, each worker has a share"]
    for w in workers:
        up = f", up {round(now - w['started'])}s" if w["state"] == "running" else ""
        last = f", last exit: {w['last_exit']}" if w["last_exit"] and w["restarts"] else ""
        lines.append(
            f"  worker {w['index']}: pid {w['pid']} {w['state']}{up}, sessions {w['sessions']}, "
            f"restarts {w['restarts']}{last}"
        )
    return lines


def _limits_lines(lim: dict | None) -> list[str]:
    """`maild status`: admission control, the memory budget, the downstream caps."""
    if not lim:
        return []
    a, b, d = lim["admission"], lim["budget"], lim["downstream"]
    mb = 1024 * 1024
    return [
        f"session slots: {a['sessions']} of {a['max_sessions']} in use, {a['strangers']} by "
        f"strangers, {a['reserved_in_use']} by customers and trusted upstreams "
        f"({a['reserved_sessions']} reserved for them); stress {'ON' if a['stress'] else 'off'}; "
        f"since start {a['shed']} idle strangers closed, {a['refused']} connections refused",
        f"mail in flight: {b['memory_in_flight'] / mb:.1f} MB in RAM of "
        f"{b['memory_in_flight_limit'] / mb:.0f} MB (peak {b['memory_in_flight_peak'] / mb:.1f} MB), "
        f"{b['spooling']} spooled to disk now, {b['spooled']} since start, "
        f"{b['refused_452']} refused 452 4.3.1",
        f"downstream caps: {d['in_use']} of {d['max']} in use ({d['reserved']} reserved for "
        f"customers and postmaster), busiest client {d['busiest_client']} of "
        f"{d['per_client_max']}; {d['busy']} transactions answered 451 4.4.5",
    ]
