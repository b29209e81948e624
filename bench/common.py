"""What every benchmark shares: the bench policy, starting maild, statistics, RSS, tables.

Why a module of its own: the benchmarks must compare like with like, so the policy
(derived from the shipped policies.toml, with every deviation listed in DEVIATIONS and
in docs/BENCHMARKS.md), the way maild is started (the real ``maild serve`` CLI, as in
production) and the statistics (median and spread over alternated repetitions) are
written once. Nothing here needs psutil, py-spy or uvloop: RSS comes from /proc.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/x.py` as well as `python -m bench.x`
    sys.path.insert(0, str(REPO))

from tests.harness.maild import render  # noqa: E402  (after the sys.path fix above)
from tests.harness.ports import free_port, port_open  # noqa: E402

BIN = Path(sys.executable).parent
MAILD = BIN / "maild"
SHIPPED_POLICY = REPO / "policies.toml"
NO_UVLOOP = Path(__file__).resolve().parent / "_nouvloop"

# The sender every load generator uses: a customer domain with DNS records in BENCH_ZONE.
SENDER = "bench@acme.example"
RECIPIENT = "rcpt@outside.example"
HELO = "client.acme.example"

# The loopback DNS server's records: the forged-header DNS checks resolve the sender's
# domain, the From: domain and the HELO name, so all of them must exist.
BENCH_ZONE = """
acme.example.        3600 IN MX 10 mx.acme.example.
mx.acme.example.     3600 IN A 127.0.0.9
client.acme.example. 3600 IN A 127.0.0.1
outside.example.     3600 IN MX 10 mx.outside.example.
mx.outside.example.  3600 IN A 192.0.2.25
hosted.example.      3600 IN MX 10 mail.hosted.example.
mail.hosted.example. 3600 IN A 127.0.0.1
"""

# Every way the bench policy differs from the shipped policies.toml, and why. Printed
# by --explain-policy and copied into docs/BENCHMARKS.md.
DEVIATIONS: tuple[str, ...] = (
    '[server] mode = "front", listen/downstream on free loopback ports, state in the bench '
    "directory, trusted_upstreams = [] (127.0.0.1 is a client here, not an upstream: no "
    "XFORWARD is accepted from it)",
    "[server.limits] max_sessions = 2000, max_sessions_per_ip = 1000: every load generator "
    "connects from 127.0.0.1 (smtp-source cannot bind a source address), and the memory "
    "benchmark holds 500 idle connections",
    '[[customers]] "bench": networks = ["127.0.0.1/32"], domains = ["acme.example"]: every '
    "message is submitted by a customer, so every customer rule runs (the shipped "
    '"example-customer" is kept)',
    "[ratelimit] every rate raised to 1,000,000,000 per period and connections_per_client = "
    "2000: the rule still runs and counts every message (reserve, commit, dirty-set, batched "
    "persistence every 6 s), it just never refuses the benchmark's volume",
    "[bulk] threshold = 1e12: smtp-source sends identical bodies, which the Breidbart rule "
    "would refuse after 20 copies; the rule still computes every message's MinHash signature, "
    "looks it up and counts the accepted copy, it just never reaches the threshold",
    "[dns] nameservers = the bench's loopback DNS server (BENCH_ZONE): the sender, From: and "
    "HELO domains exist, so the forged-header checks pass in the shipped enforce mode",
    "[retention] store path, root-mailbox list, Dovecot log and quota userdb point into the "
    "bench directory (empty): the retention service and its log follower run, but no rule is "
    "due during a benchmark",
)


# --------------------------------------------------------------------------- policy


def _huge_rates(table: dict[str, Any]) -> None:
    """Raise every rate in a [ratelimit]-style table so it never refuses (keeps periods)."""
    for key, value in list(table.items()):
        if key in ("messages", "recipients", "same_recipient", "per_login", "per_ip", "per_sender"):
            rates = [value] if isinstance(value, str) else value
            table[key] = [f"1000000000/{r.split('/', 1)[1]}" for r in rates]
        elif key == "bytes":
            rates = [value] if isinstance(value, str) else value
            table[key] = [f"1000000GB/{r.split('/', 1)[1]}" for r in rates]
        elif isinstance(value, dict):
            _huge_rates(value)


def bench_policy(
    workdir: Path,
    *,
    listen_port: int,
    downstream_port: int,
    nameserver: str,
    shipped: Path = SHIPPED_POLICY,
    workers: int = 1,
) -> dict[str, Any]:
    """The shipped policies.toml with exactly the DEVIATIONS above; every rule stays on.
    `[server] workers` is set (1 unless asked): the default "auto" depends on the machine."""
    doc = tomllib.loads(shipped.read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    server = doc.setdefault("server", {})
    server.update(
        {
            "mode": "front",
            "listen": f"127.0.0.1:{listen_port}",
            "downstream": f"127.0.0.1:{downstream_port}",
            "state": str(workdir / "state" / "maild.db"),
            "trusted_upstreams": [],
            "workers": workers,
        }
    )
    server.pop("user", None)
    server.pop("pid_file", None)
    limits = server.setdefault("limits", {})
    limits.update({"max_sessions": 2000, "max_sessions_per_ip": 1000})
    doc.setdefault("customers", []).append(
        {
            "name": "bench",
            "networks": ["127.0.0.1/32"],
            "logins": [],
            "domains": ["acme.example"],
            "addresses": [],
            "contact": "ops@acme.example",
        }
    )
    rl = doc.setdefault("ratelimit", {})
    _huge_rates(rl)
    rl["connections_per_client"] = 2000
    doc.setdefault("bulk", {})["threshold"] = 1e12
    doc.setdefault("dns", {})["nameservers"] = [nameserver]
    ret = doc.get("retention")
    if ret is not None:
        mail = workdir / "vmail"
        mail.mkdir(exist_ok=True)
        (workdir / "root-mailboxes").write_text("")
        (workdir / "mail.log").write_text("")
        ret.setdefault("store", {}).update(
            {
                "path": f"{mail}/%d/%n/Maildir",
                "root_mailboxes_file": str(workdir / "root-mailboxes"),
            }
        )
        ret.setdefault("access", {})["dovecot_log"] = str(workdir / "mail.log")
        if "quota" in ret:
            ret["quota"]["dovecot_userdb"] = str(workdir / "dovecot-quota.passwd")
    return doc


# --------------------------------------------------------------------------- processes


def rss_kb(pid: int) -> int:
    """Resident set size of a process in KiB, from /proc (no psutil needed)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raise_nofile(n: int = 20000) -> None:
    """Allow many sockets in this process and in the maild it starts (rlimits inherit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(max(soft, n), hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def uvloop_path(explicit: str | None = None) -> str | None:
    """Where uvloop can be imported from: an explicit directory, or the venv itself.

    uvloop is not a dependency of maild; the benchmarks measure with and without it by
    putting a directory on maild's PYTHONPATH (``pip install --target DIR uvloop``)."""
    if explicit:
        return explicit
    env = os.environ.get("BENCH_UVLOOP")
    if env:
        return env
    probe = subprocess.run([sys.executable, "-c", "import uvloop"], capture_output=True)
    return "" if probe.returncode == 0 else None


def end_process(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM (a graceful stop), SIGKILL if it is still there after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _knows_workers(src: str) -> bool:
    """Whether the maild tree at src has [server] workers (bench/cpu.py compares trees)."""
    return (Path(src) / "maild" / "workers").is_dir()


class MaildProc:
    """``maild serve`` as a subprocess, with a chosen event loop.

    loop="asyncio" hides uvloop (a stub module on PYTHONPATH that fails to import, so
    maild falls back to asyncio even where uvloop is installed); loop="uvloop" puts
    ``uvloop_dir`` on PYTHONPATH ("" = already importable).
    """

    def __init__(
        self,
        workdir: Path,
        policy: dict[str, Any],
        *,
        loop: str = "asyncio",
        uvloop_dir: str | None = None,
        log_name: str = "maild.log",
        extra_env: dict[str, str] | None = None,
        src: str | None = None,
    ) -> None:
        self.workdir = workdir
        # Which maild to run: a scratch tree with a proposal applied, or this checkout.
        self.src = src or os.environ.get("BENCH_MAILD_SRC") or str(REPO)
        self.policy = policy
        self.loop = loop
        self.uvloop_dir = uvloop_dir
        self.config = workdir / "policies.toml"
        self.logfile = workdir / log_name
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        host, _, port = policy["server"]["listen"].rpartition(":")
        self.host, self.port = host, int(port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        paths = [self.src]
        if self.loop == "asyncio":
            paths.insert(0, str(NO_UVLOOP))
        elif self.loop == "uvloop":
            if self.uvloop_dir is None:
                raise RuntimeError("uvloop requested but not importable (give --uvloop DIR)")
            if self.uvloop_dir:
                paths.insert(0, self.uvloop_dir)
        else:
            raise ValueError(self.loop)
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30.0) -> MaildProc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        policy = self.policy
        if not _knows_workers(self.src):  # a tree from before [server] workers: one process
            policy = {
                **policy,
                "server": {k: v for k, v in policy["server"].items() if k != "workers"},
            }
        self.config.write_text(render(policy))
        args = [str(MAILD), "serve", "-c", str(self.config), "--log", str(self.logfile)]
        if os.geteuid() == 0:
            args.append("--allow-root")
        out = open(self.workdir / "maild.stdout", "ab")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            cwd=self.workdir,
        )
        self._out = out
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"maild exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.recv(200)
                    s.sendall(b"QUIT\r\n")
                    s.recv(200)
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"maild did not listen on {self.port}:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        texts = []
        for p in (self.workdir / "maild.stdout", self.logfile):
            with contextlib.suppress(OSError):
                texts.append("\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(texts)

    def count_log(self, needle: str) -> int:
        """Lines of maild's log containing needle (e.g. ' relay ' decisions)."""
        try:
            with open(self.logfile, errors="replace") as f:
                return sum(1 for line in f if needle in line)
        except OSError:
            return 0

    def tree_rss_kb(self) -> dict[int, int]:
        """RSS of the process and every descendant (with [server] workers: the supervisor,
        the fork server and the workers), by pid."""
        self.rss_kb()  # maild itself gone is an error that names its exit and log
        return tree_rss_kb(self.pid)

    def rss_kb(self) -> int:
        try:
            return rss_kb(self.pid)
        except (OSError, RuntimeError) as e:
            code = self.proc.poll() if self.proc is not None else None
            raise RuntimeError(
                f"maild (pid {self.pid}, exit {code}) is gone: {e}\n{self.tail()}"
            ) from e

    def stop(self) -> None:
        if self.proc is None:
            return
        end_process(self.proc)
        self.proc = None
        with contextlib.suppress(Exception):
            self._out.close()

    def __enter__(self) -> MaildProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def proc_times(pid: int) -> tuple[float, float, float, float]:
    """(user, system, children's user, children's system) CPU seconds of a process, all
    its threads; the children's part counts the ones it has reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return tuple(int(f) / tck for f in fields[11:15])  # type: ignore[return-value]


def tree_rss_kb(root: int) -> dict[int, int]:
    """RSS of root and of every descendant still there, by pid."""
    out = {root: rss_kb(root)}
    for pid in descendants(root):
        with contextlib.suppress(OSError, RuntimeError):
            out[pid] = rss_kb(pid)
    return out


def descendants(root: int) -> list[int]:
    """The pids below root in the process tree, nearest first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu(roots: Iterable[int]) -> float:
    """CPU seconds (user + system) of the process trees under ``roots``, with the children
    they reaped: Postfix's master reaps every smtpd, cleanup, qmgr that exits, so the
    difference of two readings is what the whole tree spent in between."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    members, todo = set(), [r for r in roots if r in parent]
    while todo:
        pid = todo.pop()
        if pid not in members:
            members.add(pid)
            todo.extend(c for c, pp in parent.items() if pp == pid)
    total = 0.0
    for pid in members:
        with contextlib.suppress(OSError):
            total += sum(proc_times(pid))
    return total


def bench_postfix(root: Path, **options: Any) -> Any:
    """The private Postfix every benchmark measures: non-hosted mail to ``discard:``, so
    delivery does not dominate, and no queue runs during a measurement."""
    from tests.harness.postfix import Postfix

    return Postfix(
        root,
        hosted_domains=["hosted.example"],
        hostname="mx.bench.example",
        outside_sink="discard:",
        main_cf={"queue_run_delay": "300s"},
        **options,
    )


def find_tool(name: str) -> str:
    for d in ("", "/usr/sbin", "/usr/bin", "/sbin"):
        path = (
            shutil.which(name)
            if not d
            else (f"{d}/{name}" if os.path.exists(f"{d}/{name}") else None)
        )
        if path:
            return path
    raise RuntimeError(f"{name} is not installed (Debian package postfix)")


@dataclass
class SourceRun:
    """One smtp-source run: messages sent, seconds, and what smtp-source printed."""

    messages: int
    seconds: float
    returncode: int
    output: str

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


def smtp_source(
    port: int,
    *,
    sessions: int,
    messages: int,
    size: int,
    timeout: float = 600.0,
    extra: Sequence[str] = (),
) -> SourceRun:
    """Postfix's smtp-source: ``sessions`` parallel sessions, one message per session,
    ``size`` bytes of body. Any refusal aborts it (no -A), so a run that returns 0 had
    every message accepted."""
    cmd = [
        find_tool("smtp-source"),
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        "-M",
        HELO,
        "-S",
        "maild bench",
        *extra,
        f"127.0.0.1:{port}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    return SourceRun(messages, dt, proc.returncode, (proc.stdout + proc.stderr)[-2000:])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")
        time.sleep(0.05)


def start_dns() -> Any:
    """The loopback DNS server of tests/harness/dns.py, serving BENCH_ZONE."""
    from tests.harness.dns import DnsServer

    return DnsServer(BENCH_ZONE).start()


# --------------------------------------------------------------------------- statistics


@dataclass
class Stat:
    """Median and spread (min..max) of repeated measurements."""

    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(v)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def lo(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def hi(self) -> float:
        return max(self.values) if self.values else float("nan")

    def fmt(self, spec: str = ".0f", unit: str = "") -> str:
        """'median (min-max)', the form every table uses."""
        if not self.values:
            return "-"
        if len(self.values) == 1:
            return f"{self.median:{spec}}{unit}"
        return f"{self.median:{spec}}{unit} ({self.lo:{spec}}-{self.hi:{spec}})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.lo,
            "max": self.hi,
            "n": len(self.values),
            "values": self.values,
        }


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def rotate(items: Sequence[Any], i: int) -> list[Any]:
    """Order of configurations in repetition i: rotated, so no configuration always runs
    first (warm caches, a neighbour's test run starting) and biases a ratio."""
    if not items:
        return []
    k = i % len(items)
    return list(items[k:]) + list(items[:k])


# --------------------------------------------------------------------------- reporting


def machine() -> dict[str, Any]:
    """What the numbers were measured on (the docs table header)."""
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    postfix = ""
    with contextlib.suppress(Exception):
        postfix = subprocess.run(
            [find_tool("postconf"), "-h", "mail_version"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_mb": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": postfix,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def command_line() -> str:
    return " ".join(
        ["python -m " + Path(sys.argv[0]).stem if sys.argv else "python"] + sys.argv[1:]
    )


def dump_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def new_port() -> int:
    return free_port()


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the Markdown result)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(result: dict, text: str, json_path: str | None) -> dict:
    """A benchmark's end: its raw numbers to `json_path` (when asked), its tables to stdout."""
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1, default=str))
    print(text)
    return result
