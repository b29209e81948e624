"""`maild doctor`: is this deployment wired right? One line per check, with the fix.

Each check returns OK, WARN or FAIL and, unless OK, what to do. The exit code is the
worst level: 0 OK, 1 WARN, 2 FAIL. Checks only read and probe (EHLO, never a message).
Postfix's configuration is read with `postconf` (`-c DIR` for a second instance).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from maild.config import Config, parse_duration
from maild.daemonctl import daemon_status
from maild.probe import probe
from maild.store.base import Migrations, resolve_state_path

if TYPE_CHECKING:
    from maild.wiring import Wiring

LEVELS = {"OK": 0, "WARN": 1, "FAIL": 2}


@dataclass(frozen=True)
class Finding:
    name: str
    level: str
    message: str
    fix: str = ""

    def line(self) -> str:
        s = f"{self.level:4} {self.name}: {self.message}"
        return s + (f"\n     fix: {self.fix}" if self.fix and self.level != "OK" else "")


# A component's checks of its own part of the deployment (maild.components lists them).
DoctorCheck = Callable[[Config], list[Finding]]


def ok(name: str, msg: str) -> Finding:
    return Finding(name, "OK", msg)


def warn(name: str, msg: str, fix: str) -> Finding:
    return Finding(name, "WARN", msg, fix)


def fail(name: str, msg: str, fix: str) -> Finding:
    return Finding(name, "FAIL", msg, fix)


# ------------------------------------------------------------------------- state store


def check_state(config: Config, migrations: Migrations) -> Finding:
    import sqlite3

    path = resolve_state_path(config.server.state, config.path)
    p = Path(path)
    if not p.exists():
        parent = p.parent if p.parent.exists() else p.parent.parent
        if os.access(parent, os.W_OK):
            return warn(
                "state", f"{path} does not exist yet", "start `maild serve` once: it creates it"
            )
        return fail(
            "state",
            f"{path} does not exist and {parent} is not writable",
            f"create {p.parent} owned by the maild user (mode 0750)",
        )
    if not os.access(path, os.W_OK) or not os.access(p.parent, os.W_OK):
        return fail(
            "state",
            f"{path} (or its directory) is not writable by uid {os.getuid()}",
            f"chown the state directory {p.parent} to the user maild runs as",
        )
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        have = dict(db.execute("SELECT component, version FROM schema_version").fetchall())
        db.close()
    except sqlite3.Error as e:
        return fail(
            "state",
            f"{path}: {e}",
            "restore the state file from backup, or move it away and let maild create a new one",
        )
    behind = [
        f"{c} v{have.get(c, 0)}<v{len(m)}" for c, m in migrations.items() if have.get(c, 0) < len(m)
    ]
    ahead = [
        f"{c} v{v}>v{len(migrations[c])}"
        for c, v in have.items()
        if c in migrations and v > len(migrations[c])
    ]
    if ahead:
        return fail(
            "state",
            f"schema newer than this maild knows ({', '.join(ahead)})",
            "upgrade maild to the version that wrote this state",
        )
    if behind:
        return warn(
            "state",
            f"schema older than this maild ({', '.join(behind)})",
            "restart `maild serve`: it migrates the schema at start",
        )
    return ok("state", f"{path} writable, schema current")


# ------------------------------------------------------------------------- daemon, SMTP


def check_daemon(config: Config) -> Finding:
    st = daemon_status(config)
    if st is None:
        return warn(
            "daemon",
            "maild serve is not running (no live status file)",
            "systemctl start maild (or `make run` for a trial)",
        )
    age = time.time() - st.get("written", 0)
    if age > 30:
        return warn(
            "daemon",
            f"pid {st['pid']} has not updated its status for {age:.0f}s",
            "the daemon may be hung: check `journalctl -u maild`, then restart it",
        )
    workers = st.get("workers") or []
    down = [w for w in workers if w["state"] != "running"]
    if down:
        return warn(
            "daemon",
            f"pid {st['pid']}: "
            + "; ".join(
                f"worker {w['index']} {w['state']} (restarts {w['restarts']}, last exit: "
                f"{w['last_exit'] or '-'})"
                for w in down
            ),
            "a worker that keeps dying says why in the log: journalctl -u maild",
        )
    how = (
        f"; {len(workers)} workers (pids {' '.join(str(w['pid']) for w in workers)}), "
        f"restarts {sum(w['restarts'] for w in workers)}"
        if workers
        else "; one process (workers = 1)"
    )
    return ok(
        "daemon",
        f"pid {st['pid']} up {time.time() - st['started']:.0f}s, "
        f"{st['sessions']} sessions in flight{how}",
    )


def _running_differs(config: Config, key: str) -> str:
    """Where the running daemon's value of [server] KEY differs from the file's: say so,
    so that a probe of the file's address is not mistaken for what the daemon uses."""
    st = daemon_status(config)
    want = "{}:{}".format(*getattr(config.server, key))
    if st is None or not st.get(key) or st[key] == want:
        return ""
    pending = [r for r in st.get("restart_needed", []) if r.get("key") == key]
    todo = (
        f"restart maild to apply the file ({pending[0]['why']})"
        if pending
        else "`maild reload` applies the file"
    )
    return f"; the running daemon (pid {st['pid']}) uses {key} {st[key]}, not the file's {want}: {todo}"


def check_listen(config: Config) -> Finding:
    host, port = config.server.listen
    r = probe(host or "127.0.0.1", port, [], helo=config.server.hostname, timeout=5)
    other = _running_differs(config, "listen")
    if not r.connected:
        return warn(
            "listen",
            f"nothing answers on {host}:{port} ({r.error}){other}",
            "start `maild serve`; check [server] listen",
        )
    return ok("listen", f"{host}:{port} answers: {r.banner[:60]}{other}")


DOWNSTREAM_FIX = "add the re-injection smtpd to master.cf (docs/postfix.md) and `postfix reload`"


def downstream_verdict(
    host: str, port: int, *, error: str = "", answered: bool = True, xforward: bool = True
) -> Finding:
    """The downstream check's words, for doctor's probe and for the daemon's at start and
    reload: `error` when nothing usable answered (`answered`: something did, but refused
    the greeting or EHLO), else whether XFORWARD is offered to maild."""
    if error and not answered:
        return fail("downstream", f"cannot reach {host}:{port}: {error}", DOWNSTREAM_FIX)
    if error:
        return fail(
            "downstream",
            f"{host}:{port} did not answer EHLO ({error})",
            "point [server] downstream at Postfix's re-injection smtpd",
        )
    if not xforward:
        return warn(
            "downstream",
            f"{host}:{port} answers EHLO but does not offer XFORWARD to maild",
            "add -o smtpd_authorized_xforward_hosts=127.0.0.0/8 to the re-injection "
            "service, so Postfix logs the real client",
        )
    return ok("downstream", f"{host}:{port} answers EHLO and authorises XFORWARD")


def check_downstream(config: Config) -> Finding:
    host, port = config.server.downstream
    r = probe(host, port, [], helo=config.server.hostname, timeout=10)
    if not r.connected:
        c = downstream_verdict(host, port, error=r.error or "no answer", answered=False)
    elif not r.ehlo:
        c = downstream_verdict(host, port, error=r.banner or "no reply")
    else:
        c = downstream_verdict(host, port, xforward="xforward" in r.ehlo)
    other = _running_differs(config, "downstream")
    return Finding(c.name, c.level, c.message + other, c.fix) if other else c


# ------------------------------------------------------------------------- Postfix wiring


class PostconfError(Exception):
    """postconf refused: its own message (e.g. a main.cf that is not there)."""


class PostconfMissing(PostconfError):
    """No postconf on this host."""


def _run_postconf(args: list[str], confdir: str | None) -> str:
    exe = shutil.which("postconf") or (
        "/usr/sbin/postconf" if os.path.exists("/usr/sbin/postconf") else None
    )
    if exe is None:
        raise PostconfMissing("postconf is not installed (not on PATH, not in /usr/sbin)")
    cmd = [exe] + (["-c", confdir] if confdir else []) + args
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PostconfError(f"{' '.join(cmd)}: {e}") from None
    if r.returncode != 0:
        err = " ".join(r.stderr.split()) or f"exit status {r.returncode}"
        raise PostconfError(err)
    return r.stdout


def _postconf(args: list[str], confdir: str | None) -> str | None:
    """postconf's output, or None when it fails (for lookups after the first succeeded)."""
    try:
        return _run_postconf(args, confdir)
    except PostconfError:
        return None


def _hostport(value: str) -> tuple[str, int] | None:
    v = value.strip()
    v = v.split(":", 1)[1] if v.startswith(("inet:", "smtp:")) else v
    m = re.match(r"^\[?([^\]]*?)\]?:(\d+)$", v)
    return (m.group(1) or "127.0.0.1", int(m.group(2))) if m else None


def _same(a: tuple[str, int] | None, b: tuple[str, int]) -> bool:
    if a is None:
        return False
    loop = {"127.0.0.1", "localhost", ""}
    return a[1] == b[1] and (a[0] == b[0] or (a[0] in loop and b[0] in loop))


def check_postfix(config: Config, confdir: str | None) -> list[Finding]:
    try:
        params = _run_postconf(["-P"], confdir)
        services = _run_postconf(["-M"], confdir)
    except PostconfMissing as e:
        return [
            warn(
                "postfix", str(e), "install postfix on this host, or run doctor where Postfix runs"
            )
        ]
    except PostconfError as e:
        return [
            warn(
                "postfix",
                f"postconf{' -c ' + confdir if confdir else ''} failed: {e}",
                "pass --postfix-config DIR, the directory holding this Postfix's main.cf "
                "and master.cf (postconf -c DIR)",
            )
        ]
    out: list[Finding] = []
    # master.cf services: "127.0.0.1:10026 inet n - n - - smtpd -o ..."
    svc_lines = [line.split() for line in services.splitlines() if line.strip()]
    per_service: dict[str, dict[str, str]] = {}
    for line in params.splitlines():
        m = re.match(r"^(\S+)/(\w+)/(\S+)\s*=\s*(.*)$", line)
        if m:
            per_service.setdefault(f"{m.group(1)}/{m.group(2)}", {})[m.group(3)] = m.group(
                4
            ).strip()
    down = config.server.downstream
    reinject = [
        f"{s[0]}/{s[1]}"
        for s in svc_lines
        if len(s) >= 8 and s[1] == "inet" and s[7] == "smtpd" and _same(_hostport(s[0]), down)
    ]
    if not reinject:
        out.append(
            fail(
                "postfix-reinject",
                f"no smtpd service listens on {down[0]}:{down[1]} in master.cf",
                "add the re-injection service from docs/postfix.md and `postfix reload`",
            )
        )
    else:
        opts = per_service.get(reinject[0], {})
        if opts.get("smtpd_proxy_filter"):
            out.append(
                fail(
                    "postfix-reinject",
                    f"{reinject[0]} has smtpd_proxy_filter set: mail would loop",
                    f"set -o smtpd_proxy_filter= on {reinject[0]}",
                )
            )
        elif "smtpd_authorized_xforward_hosts" not in opts:
            out.append(
                warn(
                    "postfix-reinject",
                    f"{reinject[0]} does not set smtpd_authorized_xforward_hosts",
                    f"add -o smtpd_authorized_xforward_hosts=127.0.0.0/8 to {reinject[0]}",
                )
            )
        else:
            out.append(ok("postfix-reinject", f"{reinject[0]} is the re-injection smtpd"))
    if config.server.mode != "before-queue":
        return out
    listen = config.server.listen
    filtered = [
        svc
        for svc, opts in per_service.items()
        if _same(_hostport(opts.get("smtpd_proxy_filter", "")), listen)
    ]
    main_filter = (_postconf(["-h", "smtpd_proxy_filter"], confdir) or "").strip()
    if _same(_hostport(main_filter), listen):
        filtered.append("main.cf")
    if not filtered:
        out.append(
            fail(
                "postfix-proxy-filter",
                f"no smtpd service has smtpd_proxy_filter = {listen[0]}:{listen[1]}",
                f"add -o smtpd_proxy_filter={listen[0]}:{listen[1]} to the smtp (and submission) "
                "service in master.cf",
            )
        )
        return out
    out.append(ok("postfix-proxy-filter", f"{', '.join(filtered)} hand sessions to maild"))
    main_timeout = (_postconf(["-h", "smtpd_proxy_timeout"], confdir) or "100s").strip()
    for svc in filtered:
        raw = per_service.get(svc, {}).get("smtpd_proxy_timeout", main_timeout)
        try:
            t = parse_duration(raw)
        except ValueError:
            out.append(
                warn(
                    "postfix-proxy-timeout",
                    f"{svc}: cannot read smtpd_proxy_timeout = {raw}",
                    "write it as seconds, e.g. 100s",
                )
            )
            continue
        if t <= config.server.downstream_timeout:
            out.append(
                fail(
                    "postfix-proxy-timeout",
                    f"{svc}: smtpd_proxy_timeout = {raw} is not above maild's downstream_timeout "
                    f"({config.server.downstream_timeout:g}s): a slow downstream would duplicate mail",
                    "raise smtpd_proxy_timeout to 100s, or lower [server] downstream_timeout",
                )
            )
        else:
            out.append(
                ok(
                    "postfix-proxy-timeout",
                    f"{svc}: {raw} > downstream_timeout {config.server.downstream_timeout:g}s",
                )
            )
    auth_header = (_postconf(["-h", "smtpd_sasl_authenticated_header"], confdir) or "").strip()
    if auth_header != "yes":
        out.append(
            warn(
                "postfix-sasl-header",
                "smtpd_sasl_authenticated_header is not yes: maild cannot see SASL logins",
                "postconf -e smtpd_sasl_authenticated_header=yes",
            )
        )
    return out


# ------------------------------------------------------------------------- DNS, systemd


def check_dns(config: Config) -> Finding:
    import dns.exception
    import dns.resolver

    section = config.sections.get("dns")
    res = dns.resolver.Resolver(configure=not getattr(section, "nameservers", None))
    servers = getattr(section, "nameservers", None) or ()
    if servers:
        res.nameservers = [
            s.rsplit(":", 1)[0].strip("[]") if s.count(":") == 1 or s.startswith("[") else s
            for s in servers
        ]
        ports = {int(s.rsplit(":", 1)[1]) for s in servers if s.count(":") == 1 or "]:" in s}
        if ports:
            res.port = ports.pop()
    res.lifetime = 5.0
    name = (config.postmaster.domains or (config.server.hostname,))[0]
    try:
        res.resolve(name, "MX")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        pass  # an answer, even a negative one, is what we want to know about
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
        return fail(
            "dns",
            f"the resolver did not answer for {name}: {type(e).__name__}",
            "check /etc/resolv.conf or [dns] nameservers; header checks tempfail without DNS",
        )
    return ok("dns", f"resolver answers ({', '.join(map(str, res.nameservers))})")


UNIT_PATHS = (
    "/etc/systemd/system/maild.service",
    "/lib/systemd/system/maild.service",
    "/usr/lib/systemd/system/maild.service",
)


def check_systemd(config: Config, unit: str | None = None) -> Finding:
    path = unit or next((p for p in UNIT_PATHS if os.path.exists(p)), None)
    if path is None:
        return warn(
            "systemd",
            "maild.service is not installed",
            "install systemd/maild.service (docs/install.md)",
        )
    text = Path(path).read_text()
    m = re.search(r"^User=(\S+)", text, re.M)
    user = m.group(1) if m else "root"
    if user == "root":
        return warn("systemd", f"{path} runs maild as root", "set User=maild (docs/install.md)")
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return fail(
            "systemd", f"{path}: User={user} does not exist", f"adduser --system --group {user}"
        )
    state_dir = Path(resolve_state_path(config.server.state, config.path)).parent
    if state_dir.exists():
        st = state_dir.stat()
        if st.st_uid != pw.pw_uid:
            return fail(
                "systemd",
                f"{state_dir} belongs to uid {st.st_uid}, not {user}",
                f"chown -R {user}: {state_dir}",
            )
    return ok("systemd", f"{path}: runs as {user}, who owns {state_dir}")


# ------------------------------------------------------------------------- all together


def run_all(
    config: Config, parts: Wiring, *, postfix_config: str | None = None, unit: str | None = None
) -> list[Finding]:
    """Every check: maild's own, then the components' (parts.doctor_checks), then systemd."""
    checks = [
        ok("config", f"{config.path} is valid"),
        check_state(config, parts.migrations),
        check_daemon(config),
        check_listen(config),
        check_downstream(config),
    ]
    checks += check_postfix(config, postfix_config)
    checks.append(check_dns(config))
    for extra in parts.doctor_checks:
        checks += extra(config)
    checks.append(check_systemd(config, unit))
    return checks


def exit_code(checks: list[Finding]) -> int:
    return max((LEVELS[c.level] for c in checks), default=0)
