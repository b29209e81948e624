"""Peers: Postfix alone, and Postfix with each add-on an operator would put in the same place.

Why: maild's cost only means something next to what the alternatives cost on the same
machine, in the same run. Every configuration is its own private Postfix (tests/harness)
delivering to ``discard:``, fed the same smtp-source load; the add-ons are told to count
every message but never refuse one:

* ``postfix``             Postfix alone (its public smtpd);
* ``rspamd``              rspamd as a milter on that smtpd (its proxy worker in milter mode,
                          self-scan), default rules, ratelimit and the other Redis modules on
                          a private redis-server, the modules that need the internet disabled
                          (RSPAMD_DISABLED), actions out of reach;
* ``postfwd``             postfwd (Debian's postfwd2) as a policy service at RCPT, one rule:
                          one rate counter per client address, far above the load;
* ``policyd-rate-limit``  policyd-rate-limit (PyPI, SQLite backend) as a policy service at
                          DATA, per client address, one limit far above the load;
* ``maild-before-queue``  Postfix's smtpd hands every session to maild (smtpd_proxy_filter),
                          maild relays to Postfix's re-injection smtpd; every rule on;
* ``maild-front``         smtp-source talks to maild (front mode, every rule on), maild to
                          Postfix's re-injection smtpd.

A run counts only when every message was accepted (smtp-source aborts on a refusal), the
discard transport logged every one of them, and the add-on shows each message in its own
log or store. CPU per message is user + system time from /proc of the component's process
trees (children reaped by a parent included), over the run and its drain. A component that
cannot be installed is reported as "not installed", never left out.

    python -m bench.peers [--messages 3000] [--sessions 20] [--size 2048] [--reps 5]
                          [--only postfix,rspamd,...] [--no-install]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    MaildProc,
    Stat,
    bench_policy,
    bench_postfix,
    emit,
    end_process,
    log,
    machine,
    new_port,
    raise_nofile,
    rotate,
    smtp_source,
    start_dns,
    table,
    tree_cpu,
    verdict,
    wait_port,
)
from tests.harness.postfix import cleanup_runtime_dir, find_binary, runtime_dir
from tests.harness.waits import patience, wait_until

CONFIGS = (
    "postfix",
    "rspamd",
    "postfwd",
    "policyd-rate-limit",
    "maild-before-queue",
    "maild-front",
)
LABELS = {
    "postfix": "Postfix alone (discard)",
    "rspamd": "+ rspamd milter, ratelimit on Redis, default rules",
    "postfwd": "+ postfwd (one rate counter, policy service)",
    "policyd-rate-limit": "+ policyd-rate-limit (SQLite, policy service)",
    "maild-before-queue": "+ maild before-queue (every rule)",
    "maild-front": "maild front (every rule) -> Postfix re-injection",
}
# Debian packages per configuration (checked with dpkg, installed with apt-get).
DEB_NEEDS = {"rspamd": ("rspamd", "redis-server"), "postfwd": ("postfwd",)}
PYPI_POLICYD = "policyd-rate-limit"

# rspamd modules that query the internet for every message (or fetch rules from it):
# disabled, so rspamd's cost is its local work, as maild's is. Named in docs/BENCHMARKS.md.
RSPAMD_DISABLED = {
    "rbl": "DNS blocklists of IPs, HELO, URLs (URIBL/SURBL) and DKIM domains",
    "surbl": "URL blocklists (the legacy module)",
    "emails": "blocklists of e-mail addresses",
    "fuzzy_check": "rspamd.com's fuzzy hash storage",
    "dcc": "the DCC checksum network",
    "external_services": "Razor, Pyzor and the other external scanners",
    "asn": "ASN lookups in asn.rspamd.com",
    "rspamd_update": "rule updates from updates.rspamd.com",
}
# issue 16's targets for the peer run: maild's share of Postfix alone (and >= 2x rspamd)
TARGETS = {"maild-front": 0.60, "maild-before-queue": 0.45}
NEVER = 1_000_000_000  # "a limit far above the load", for every add-on's counter


# --------------------------------------------------------------------------- installing


def deb_installed(pkg: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return out.returncode == 0 and "ok installed" in out.stdout


def apt(*args: str, tries: int = 30) -> bool:
    """apt-get, waiting while another process holds the apt/dpkg lock."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for _ in range(tries):
        p = subprocess.run(
            ["apt-get", "-o", "DPkg::Lock::Timeout=60", *args],
            capture_output=True,
            text=True,
            env=env,
        )
        if p.returncode == 0:
            return True
        if "lock" not in (p.stderr + p.stdout).lower():
            log(f"apt-get {' '.join(args)} failed:\n{p.stderr[-1500:]}")
            return False
        log("apt is locked by another process; waiting")
        time.sleep(10)
    return False


def install_debs(pkgs: Sequence[str]) -> list[str]:
    """Install the missing Debian packages (as root); return the ones still missing."""
    missing = [p for p in pkgs if not deb_installed(p)]
    if missing and os.geteuid() == 0:
        log(f"installing Debian packages: {' '.join(missing)}")
        if apt("update", "-qq"):
            apt("install", "-y", "-qq", "--no-install-recommends", *missing)
        missing = [p for p in missing if not deb_installed(p)]
    return missing


def install_policyd(target: Path, install: bool) -> Path | None:
    """policyd-rate-limit in a private venv (never in maild's environment); its script."""
    exe = target / "bin" / "policyd-rate-limit"
    if not exe.exists() and install:
        log(f"installing {PYPI_POLICYD} into {target}")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(target)], check=True)
        p = subprocess.run(
            [str(target / "bin" / "pip"), "install", "-q", PYPI_POLICYD],
            capture_output=True,
            text=True,
        )
        if p.returncode != 0:
            log(f"pip install {PYPI_POLICYD} failed:\n{p.stderr[-1500:]}")
    return exe if exe.exists() else None


# --------------------------------------------------------------------------- add-ons


def count_lines(path: Path, needle: str) -> int:
    try:
        with open(path, errors="replace") as f:
            return sum(1 for line in f if needle in line)
    except OSError:
        return 0


def own_dir(path: Path, user: str) -> Path:
    """A directory the add-on's unprivileged user may write (they all drop root)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(path, user, user if user != "nobody" else "nogroup")
    return path


class Daemon:
    """One add-on process started in the foreground, its output in a file."""

    def __init__(self, name: str, args: Sequence[str], out: Path, **popen: Any) -> None:
        self.name, self.args, self.out_path, self.popen = name, list(args), out, popen
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> Daemon:
        self._out = open(self.out_path, "ab")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            self.args,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **self.popen,
        )
        try:
            wait_port(port, timeout=patience(60))
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{self.name}: {e}\n{self.tail()}") from e
        return self

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.out_path.read_text(errors="replace").splitlines()[-30:])
        return ""

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)
        self.proc = None
        with contextlib.suppress(Exception):
            self._out.close()


class Addon:
    """What a configuration adds to Postfix: its processes, its smtpd options, its count."""

    name = ""
    debs: tuple[str, ...] = ()

    def __init__(self, workdir: Path, dns: Any) -> None:
        self.workdir, self.dns = workdir, dns
        self.daemons: list[Daemon] = []

    def start(self) -> None:
        """Start the processes (before Postfix: smtpd must find them)."""

    def smtpd_options(self) -> dict[str, str]:
        return {}

    def seen(self) -> int:
        """Messages the add-on has handled so far, from its own log or store."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        return [d.proc.pid for d in self.daemons if d.proc is not None]

    def tail(self) -> str:
        return "\n".join(d.tail() for d in self.daemons)

    def stop(self) -> None:
        for d in reversed(self.daemons):
            d.stop()


class Rspamd(Addon):
    """rspamd 3.x from Debian's /etc/rspamd, with a private local.d/override.d."""

    name = "rspamd"
    debs = DEB_NEEDS["rspamd"]

    def start(self) -> None:
        conf = self.workdir / "conf"
        for sub in ("local.d", "override.d"):
            (conf / sub).mkdir(parents=True, exist_ok=True)
        run = own_dir(self.workdir / "run", "_rspamd")
        db = own_dir(self.workdir / "db", "_rspamd")
        logs = own_dir(self.workdir / "log", "_rspamd")
        self.log_path = logs / "rspamd.log"
        redis_dir = own_dir(self.workdir / "redis", "redis")
        self.redis_port, self.milter_port, ctl_port = new_port(), new_port(), new_port()
        self.daemons.append(
            Daemon(
                "redis",
                [
                    find_binary("redis-server") or "redis-server",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.redis_port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(redis_dir),
                    "--daemonize",
                    "no",
                ],
                self.workdir / "redis.out",
                user="redis",
            ).start(self.redis_port)
        )
        local = {
            "redis.conf": f'servers = "127.0.0.1:{self.redis_port}";\n',
            "options.inc": f'dns {{ nameserver = ["{self.dns.nameserver}"]; }}\n',
            # count, never refuse: no score reaches an action, no bucket fills
            "actions.conf": "".join(
                f"{a} = {NEVER};\n" for a in ("reject", "add_header", "rewrite_subject", "greylist")
            ),
            "ratelimit.conf": (
                'rates {\n  bench_ip = { selector = "ip"; bucket = { burst = '
                f'{NEVER}; rate = "{NEVER} / 1h"; }} }}\n}}\n'
            ),
            **{f"{m}.conf": "enabled = false;\n" for m in RSPAMD_DISABLED},
        }
        for fname, text in local.items():
            (conf / "local.d" / fname).write_text(text)
        override = {
            "worker-proxy.inc": (
                f'bind_socket = "127.0.0.1:{self.milter_port}";\nmilter = yes;\n'
                'upstream "local" { default = yes; self_scan = yes; }\n'
            ),
            "worker-controller.inc": f'bind_socket = "127.0.0.1:{ctl_port}";\n',
            # self-scan: the proxy scans, so the normal worker would only sit idle
            "worker-normal.inc": "enabled = false;\n",
        }
        for fname, text in override.items():
            (conf / "override.d" / fname).write_text(text)
        os.chmod(self.workdir, 0o755)
        for d in (conf, conf / "local.d", conf / "override.d"):
            os.chmod(d, 0o755)
        rspamd = find_binary("rspamd") or "rspamd"
        args = [
            rspamd,
            "-f",
            "-c",
            "/etc/rspamd/rspamd.conf",
            "-u",
            "_rspamd",
            "-g",
            "_rspamd",
            f"--var=LOCAL_CONFDIR={conf}",
            f"--var=RUNDIR={run}",
            f"--var=DBDIR={db}",
            f"--var=LOGDIR={logs}",
        ]
        self.daemons.append(
            Daemon("rspamd", args, self.workdir / "rspamd.out").start(self.milter_port)
        )

    def smtpd_options(self) -> dict[str, str]:
        # tempfail if rspamd fails: a message it never saw must not count as delivered
        return {
            "smtpd_milters": f"inet:127.0.0.1:{self.milter_port}",
            "milter_default_action": "tempfail",
            "milter_protocol": "6",
            "milter_mail_macros": "i {mail_addr} {client_addr} {client_name} {auth_authen}",
        }

    def seen(self) -> int:
        return count_lines(self.log_path, "rspamd_task_write_log")

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return (
                super().tail()
                + "\n"
                + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
            )
        return super().tail()


class Syslog:
    """A syslog receiver on 127.0.0.1:514/udp, for the add-on that only logs to syslog.

    postfwd logs only to syslog (its startup and its warnings); without a syslog daemon
    (a container) its datagrams would bounce. The lines go to a file for a look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 514))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with open(self.path, "ab", buffering=0) as f:
            while True:
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    return
                f.write(data.rstrip(b"\0\n") + b"\n")

    def close(self) -> None:
        self.sock.close()


class Postfwd(Addon):
    """Debian's postfwd (postfwd2: a pre-forking Perl policy server and its cache daemon),
    one rule: one rate counter per client address."""

    name = "postfwd"
    debs = DEB_NEEDS["postfwd"]
    RULE_ID = "BENCH_RATE"

    def __init__(self, workdir: Path, dns: Any) -> None:
        super().__init__(workdir, dns)
        self.pidfile = workdir / "postfwd.pid"
        self.syslog: Syslog | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.cache_port = new_port(), new_port()
        rules = self.workdir / "postfwd.cf"
        # a day: the counter must not expire (and restart from 0) during the run
        rules.write_text(
            f"id={self.RULE_ID}; action=rate(client_address/{NEVER}/86400/"
            "450 4.7.1 rate limit reached)\n"
        )
        try:
            self.syslog = Syslog(self.workdir / "syslog")
        except OSError as e:  # a syslog daemon holds the port: it receives the lines
            log(f"postfwd logs to the syslog daemon on 127.0.0.1:514 ({e})")
        # postfwd2 counts rates only as a daemon (its cache process holds the counters)
        exe = find_binary("postfwd") or "postfwd"
        out = self.workdir / "postfwd.out"
        with open(out, "ab") as f:
            subprocess.run(
                [
                    exe,
                    "--socktype",
                    "udp",
                    "--file",
                    str(rules),
                    "--server_socket",
                    f"tcp:127.0.0.1:{self.port}",
                    "--cache_socket",
                    f"tcp:127.0.0.1:{self.cache_port}",
                    "--user",
                    "nobody",
                    "--group",
                    "nogroup",
                    "--pidfile",
                    str(self.pidfile),
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                check=True,
                timeout=60,
            )
        wait_port(self.port, timeout=patience(60))

    def smtpd_options(self) -> dict[str, str]:
        return {"smtpd_recipient_restrictions": f"check_policy_service inet:127.0.0.1:{self.port}"}

    def master(self) -> int | None:
        """postfwd's pid, only while that pid is still postfwd (pid numbers are reused)."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(self.pidfile.read_text().split()[0])
            if b"postfwd" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        return None

    def pids(self) -> list[int]:
        pid = self.master()
        return [pid] if pid else []

    def seen(self) -> int:
        """The rate counter itself, from postfwd's cache daemon (what --dumpcache shows)."""
        with socket.create_connection(("127.0.0.1", self.cache_port), timeout=10) as s:
            s.sendall(b"CMD=DC;\n")
            dump = s.makefile("rb").readline().decode(errors="replace")
        m = re.search(rf"%{self.RULE_ID}\+\d+_\d+ -> @count\s+-> '(\d+)'", dump)
        return int(m.group(1)) if m else 0

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(
                (self.workdir / "syslog").read_text(errors="replace").splitlines()[-20:]
            )
        return ""

    def stop(self) -> None:
        pid = self.master()
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=10)
        if self.syslog is not None:
            self.syslog.close()


class PolicydRateLimit(Addon):
    """policyd-rate-limit 1.x (PyPI) with its SQLite backend, counting at DATA."""

    name = "policyd-rate-limit"

    def __init__(self, workdir: Path, dns: Any, exe: Path) -> None:
        super().__init__(workdir, dns)
        self.exe = exe

    def start(self) -> None:
        data = own_dir(self.workdir / "data", "nobody")
        self.db = data / "db.sqlite3"
        self.port = new_port()
        conf = self.workdir / "policyd-rate-limit.yaml"
        conf.write_text(
            f"""debug: False
user: "nobody"
group: "nogroup"
pidfile: "{data}/policyd-rate-limit.pid"
sqlite_config:
    database: "{self.db}"
backend: 0
SOCKET: ["127.0.0.1", {self.port}]
limits:
    - [{NEVER}, 3600]
limits_by_id: {{}}
sql_limits_by_id: ""
limit_by_sasl: False
limit_by_sender: False
limit_by_ip: True
limited_networks: ["127.0.0.0/8"]
success_action: "dunno"
fail_action: "defer_if_permit Rate limit reach, retry later"
db_error_action: "dunno"
report: False
delay_to_close: 300
count_mode: 1
"""
        )
        self.daemons.append(
            Daemon(
                "policyd-rate-limit",
                [str(self.exe), "--file", str(conf)],
                self.workdir / "policyd.out",
            ).start(self.port)
        )

    def smtpd_options(self) -> dict[str, str]:
        return {"smtpd_data_restrictions": f"check_policy_service inet:127.0.0.1:{self.port}"}

    def seen(self) -> int:
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
            ) as db:
                return int(db.execute("SELECT COUNT(*) FROM mail_count").fetchone()[0])
        except sqlite3.Error:
            return 0


class MaildAddon(Addon):
    """maild with the bench policy (every rule on), before-queue or front."""

    def __init__(self, workdir: Path, dns: Any, mode: str, workers: int = 1) -> None:
        super().__init__(workdir, dns)
        self.mode = mode
        self.workers = workers  # [server] workers: CPU is counted over the whole tree
        self.name = f"maild-{mode}"
        self.maild: MaildProc | None = None
        self.port = 0

    def start(self) -> None:
        self.port = new_port()

    def start_maild(self, downstream_port: int) -> None:
        """maild needs Postfix's re-injection port, so it starts with Postfix."""
        policy = bench_policy(
            self.workdir,
            listen_port=self.port,
            downstream_port=downstream_port,
            nameserver=self.dns.nameserver,
            workers=self.workers,
        )
        if self.mode == "before-queue":
            # Postfix's smtpd is the upstream here: it passes the client on with XFORWARD
            policy["server"].update({"mode": "before-queue", "trusted_upstreams": ["127.0.0.1/32"]})
        self.maild = MaildProc(self.workdir, policy).start()

    def smtpd_options(self) -> dict[str, str]:
        return {"smtpd_proxy_filter": f"127.0.0.1:{self.port}"} if self.mode != "front" else {}

    def seen(self) -> int:
        return self.maild.count_log(": relay: DATA") if self.maild else 0

    def pids(self) -> list[int]:
        return [self.maild.pid] if self.maild is not None and self.maild.proc else []

    def tail(self) -> str:
        return self.maild.tail() if self.maild else ""

    def stop(self) -> None:
        if self.maild is not None:
            self.maild.stop()


# --------------------------------------------------------------------------- one configuration


@dataclass
class Peer:
    """A private Postfix and the add-on in front of or beside it."""

    name: str
    workdir: Path
    addon: Addon | None = None
    missing: str = ""  # why it cannot run: "not installed (...)"
    pf: Any = None
    rates: Stat = field(default_factory=Stat)
    ratios: Stat = field(default_factory=Stat)
    vs_rspamd: Stat = field(default_factory=Stat)  # msg/s over rspamd's, per repetition
    uncounted: list[str] = field(default_factory=list)  # runs that failed a check, and why
    addon_us: Stat = field(default_factory=Stat)
    postfix_us: Stat = field(default_factory=Stat)

    def start(self, attempts: int = 2) -> None:
        """Start the add-on, then its Postfix. A second attempt, on new ports, when the
        first fails: a port chosen free can be taken by another process before the
        add-on (rspamd needs 15 s on this machine) binds it."""
        for attempt in range(attempts):
            try:
                if self.addon is not None:
                    self.addon.start()
                opts = self.addon.smtpd_options() if self.addon is not None else {}
                self.pf = bench_postfix(
                    self.workdir / f"pf{attempt or ''}",
                    smtpd_options=opts,
                    proxy_timeout="100s" if "smtpd_proxy_filter" in opts else None,
                )
                if isinstance(self.addon, MaildAddon):
                    self.addon.start_maild(self.pf.reinject_port)
                self.pf.start()
                return
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                log(f"{self.name} did not start (attempt {attempt + 1}): {e}")
                self.stop()
                if attempt + 1 == attempts:
                    raise

    @property
    def port(self) -> int:
        if isinstance(self.addon, MaildAddon) and self.addon.mode == "front":
            return self.addon.port
        return self.pf.smtpd_port

    def delivered(self, since: int) -> int:
        return sum(
            1
            for line in self.pf.log(since).splitlines()
            if "/discard[" in line and "status=sent" in line
        )

    def cpu(self) -> tuple[float, float]:
        """(add-on, Postfix) CPU seconds so far."""
        addon = tree_cpu(self.addon.pids()) if self.addon is not None else 0.0
        return addon, tree_cpu([self.pf.master_pid() or 0])

    def run(self, messages: int, sessions: int, size: int) -> tuple[float, float, float]:
        """One counted run: (msg/s, add-on us/msg, Postfix us/msg)."""
        mark, seen0 = self.pf.log_mark(), self.addon.seen() if self.addon else 0
        cpu0 = self.cpu()
        r = smtp_source(self.port, sessions=sessions, messages=messages, size=size)
        if r.returncode != 0:
            raise RuntimeError(f"smtp-source into {self.name} failed:\n{r.output}\n{self.tail()}")
        if wait_until(lambda: self.delivered(mark) >= messages, timeout=150) is None:
            raise RuntimeError(
                f"{self.name}: {self.delivered(mark)} of {messages} delivered\n{self.pf.log_tail()}"
            )
        seen = 0
        if self.addon is not None:
            # every add-on logs or stores a message before Postfix's 250 for it
            seen = self.addon.seen() - seen0
            if seen < messages:
                raise RuntimeError(f"{self.name} saw {seen} of {messages}:\n{self.tail()}")
        self.pf.wait_queue_empty(timeout=150)
        cpu1 = self.cpu()
        delivered = self.delivered(mark)
        if delivered != messages or (self.addon is not None and seen != messages):
            raise RuntimeError(f"{self.name}: {delivered} delivered, {seen} seen, of {messages}")
        return (r.rate, 1e6 * (cpu1[0] - cpu0[0]) / messages, 1e6 * (cpu1[1] - cpu0[1]) / messages)

    def tail(self) -> str:
        return (self.addon.tail() if self.addon else "") + "\n" + self.pf.log_tail()

    def stop(self) -> None:
        if self.pf is not None:
            self.pf.close()
        if self.addon is not None:
            self.addon.stop()

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": LABELS[self.name],
            "missing": self.missing,
            "rates": self.rates.as_dict(),
            "ratios": self.ratios.as_dict(),
            "vs_rspamd": self.vs_rspamd.as_dict(),
            "uncounted": self.uncounted,
            "addon_cpu_us": self.addon_us.as_dict(),
            "postfix_cpu_us": self.postfix_us.as_dict(),
        }


def make_peers(
    names: Sequence[str], workdir: Path, dns: Any, install: bool, workers: int = 1
) -> list[Peer]:
    """Every configuration asked for; the ones whose component is missing say why."""
    debs = sorted({p for n in names for p in DEB_NEEDS.get(n, ())})
    missing_debs = set(install_debs(debs) if install else [p for p in debs if not deb_installed(p)])
    factories: dict[str, Callable[[Path], Addon | None]] = {
        "postfix": lambda wd: None,
        "rspamd": lambda wd: Rspamd(wd, dns),
        "postfwd": lambda wd: Postfwd(wd, dns),
        "maild-before-queue": lambda wd: MaildAddon(wd, dns, "before-queue", workers),
        "maild-front": lambda wd: MaildAddon(wd, dns, "front", workers),
    }
    peers = []
    for name in names:
        wd = workdir / name
        gone = sorted(set(DEB_NEEDS.get(name, ())) & missing_debs)
        if gone:
            peers.append(Peer(name, wd, missing=f"not installed ({', '.join(gone)})"))
        elif name == "policyd-rate-limit":
            exe = install_policyd(workdir / "pyenv", install)
            peers.append(
                Peer(name, wd, PolicydRateLimit(wd, dns, exe))
                if exe
                else Peer(name, wd, missing=f"not installed (PyPI {PYPI_POLICYD})")
            )
        else:
            peers.append(Peer(name, wd, factories[name](wd)))
    return peers


# --------------------------------------------------------------------------- the run


def measure(peers: list[Peer], *, messages: int, sessions: int, size: int, reps: int) -> None:
    live = [p for p in peers if not p.missing]
    for p in live:  # unmeasured warm-up: imports, pools, DNS caches, process pools
        p.run(min(messages, sessions * 4), sessions, size)
    for rep in range(reps):
        rates: dict[str, float] = {}
        for p in rotate(live, rep):
            try:
                rate, addon_us, postfix_us = p.run(messages, sessions, size)
            except RuntimeError as e:  # not counted; said in the table and the JSON
                log(f"   rep {rep + 1} {p.name}: not counted: {e}")
                p.uncounted.append(f"rep {rep + 1}: {str(e).splitlines()[0]}")
                with contextlib.suppress(AssertionError):
                    p.pf.wait_queue_empty(timeout=150)
                continue
            rates[p.name] = rate
            p.rates.add(rate)
            p.postfix_us.add(postfix_us)
            if p.addon is not None:
                p.addon_us.add(addon_us)
            log(
                f"   rep {rep + 1} {p.name:20s} {rate:7.0f} msg/s, add-on {addon_us:5.0f} us/msg,"
                f" Postfix {postfix_us:5.0f} us/msg"
            )
        for p in live:
            if p.name not in rates:
                continue
            if "postfix" in rates:
                p.ratios.add(rates[p.name] / rates["postfix"])
            if "rspamd" in rates:
                p.vs_rspamd.add(rates[p.name] / rates["rspamd"])


def report(peers: list[Peer], args: argparse.Namespace, info: dict[str, Any], cmd: str) -> str:
    rows = []
    for p in peers:
        if p.missing:
            rows.append([LABELS[p.name], p.missing, "-", "-", "-"])
            continue
        rows.append(
            [
                LABELS[p.name],
                p.rates.fmt(),
                p.ratios.fmt(".0%"),
                p.addon_us.fmt(".0f", " us") if p.addon is not None else "-",
                p.postfix_us.fmt(".0f", " us"),
            ]
        )
    head = (
        f"Measured {info['date']} with `{cmd}`: {args.messages} messages of {args.size} B "
        f"per run, {args.sessions} sessions, {args.reps} repetition(s), configurations "
        "alternated; median (min-max); the ratio is taken within each repetition. CPU per "
        "message is user + system from /proc (load average at the start: "
        f"{info['loadavg']})."
    )
    failed = [f"{p.name} {u}" for p in peers for u in p.uncounted]
    if failed:
        head += " Runs not counted (a message not delivered or not seen): " + "; ".join(failed)
    by_name = {p.name: p for p in peers}
    trows = []
    for name, floor in TARGETS.items():
        p = by_name.get(name)
        if p is None:
            continue
        st = p.ratios
        trows.append(
            [f">= {floor:.0%} of Postfix alone ({name})", st.fmt(".0%"), status(p, st, floor)]
        )
        st = p.vs_rspamd
        trows.append(
            [
                f">= 2x rspamd's msg/s ({name})",
                st.fmt(".2f", "x"),
                status(p, st, 2.0, by_name.get("rspamd")),
            ]
        )
    return (
        head
        + "\n\n"
        + table(
            [
                "configuration",
                "msg/s",
                "of Postfix alone",
                "add-on CPU per message",
                "Postfix CPU per message",
            ],
            rows,
        )
        + "\n\n"
        + table(["target", "measured", "status"], trows)
        + "\n"
    )


def status(p: Peer, st: Stat, floor: float, other: Peer | None = None) -> str:
    """met/missed, or why it could not be measured (a component not installed)."""
    for q in (p, other):
        if q is not None and q.missing:
            return f"n/a: {q.name} {q.missing}"
    return verdict(st.median >= floor) if st.values else verdict(None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=3000, help="per run")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=2048, help="body bytes")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations")
    ap.add_argument(
        "--no-install",
        action="store_true",
        help="do not apt-get/pip install what is missing (report it instead)",
    )
    ap.add_argument(
        "--maild-workers",
        type=int,
        default=1,
        help="[server] workers for both maild configurations (their CPU is the whole tree's)",
    )
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write raw results here")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")

    raise_nofile()
    # The add-ons drop root and must reach their directories: under a 0700 parent (pytest's
    # tmp_path) the work happens in /tmp, linked from --workdir, and is removed on success.
    workdir, in_tmp = runtime_dir(
        Path(args.workdir or tempfile.mkdtemp(prefix="maild-bench-peers-")), "maild-peers-"
    )
    info = machine()
    dns = start_dns()
    peers = make_peers(names, workdir, dns, install=not args.no_install, workers=args.maild_workers)
    try:
        for p in peers:
            if not p.missing:
                log(f"starting {p.name}")
                p.start()
        measure(
            peers, messages=args.messages, sessions=args.sessions, size=args.size, reps=args.reps
        )
    finally:
        for p in peers:
            p.stop()
        dns.stop()
    if in_tmp:
        cleanup_runtime_dir(workdir)
    cmd = "python -m bench.peers " + " ".join(argv if argv is not None else sys.argv[1:])
    md = report(peers, args, info, cmd.strip())
    result = {
        "benchmark": "peers",
        "machine": info,
        "command": cmd.strip(),
        "messages": args.messages,
        "sessions": args.sessions,
        "size": args.size,
        "reps": args.reps,
        "peers": {p.name: p.as_dict() for p in peers},
        "rspamd_disabled": RSPAMD_DISABLED,
        "markdown": md,
    }
    return emit(result, md, args.json)


if __name__ == "__main__":
    main()
