"""Run the golden corpus through the maild on sys.path and print the outputs as JSON.

    python -m tests.golden.run [OUT.json]

Everything runs in this process: maild's daemon (its real SMTP server class, proxy and
state store, SQLite in a temporary directory), an aiosmtpd server as the downstream
(accepts all but recipients nouser@...), the loopback DNS server of tests/harness/dns.py
and `maild check-message` through click. The clock rules read (time.time) is fixed, and
moved only by each case's ``advance``; it is installed before maild is imported so every
default ``clock=time.time`` is the fixed one. Outputs are normalised only for what
differs between runs (session and queue ids, ports, tokens, paths, pids).
"""

from __future__ import annotations

import calendar
import time

EPOCH = float(calendar.timegm((2026, 3, 2, 10, 0, 0)))
_now = [EPOCH]
_real_time = time.time
time.time = lambda: _now[0]  # before any maild import: see the docstring
time.time_ns = lambda: int(_now[0] * 1e9)

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from email.utils import format_datetime  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.golden import corpus  # noqa: E402
from tests.harness.dns import STANDARD_DROP, STANDARD_SERVFAIL, STANDARD_ZONE, DnsServer  # noqa: E402

HANG = 30.0
# The customers' own domains, besides the harness's standard names.
ZONE = STANDARD_ZONE + "".join(
    f"{d}. 3600 IN MX 10 mx.{d}.\nmx.{d}. 3600 IN A 192.0.2.40\n"
    for d in ("rl.example", "bulk.example", "bad.example", "many.example", "listco.example")
)
GRANTOR = "R. Roe, trusted-partner.example, ticket 4711"


# --------------------------------------------------------------------------- policies


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def toml(doc: dict) -> str:
    """Top-level tables and arrays of tables; anything deeper inline."""
    out = []
    for name, section in doc.items():
        rows = section if isinstance(section, list) else [section]
        for row in rows:
            out.append(f"[[{name}]]" if isinstance(section, list) else f"[{name}]")
            out += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in row.items()]
            out.append("")
    return "\n".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smtp_policy(downstream: int, nameserver: str, state: str) -> dict:
    lists = corpus.LISTS
    return {
        "server": {
            "mode": "front",
            "listen": f"127.0.0.1:{free_port()}",
            "downstream": f"127.0.0.1:{downstream}",
            "hostname": "mx.hosted.example",
            "state": state,
            "trusted_upstreams": ["127.0.0.1/32"],
            "downstream_timeout": "20s",
            "limits": {
                "message_size": 4000,
                "recipients_per_message": 4,
                "command_timeout": "60s",
                "data_timeout": "60s",
            },
        },
        "postmaster": {"domains": ["hosted.example", lists], "hostnames": ["host.hosted.example"]},
        "customers": [
            {
                "name": "acme",
                "networks": [f"{corpus.ACME}/32"],
                "logins": ["alice"],
                "domains": ["acme.example"],
                "contact": "ops@acme.example",
            },
            {
                "name": "rl",
                "networks": [f"{corpus.RL}/32"],
                "domains": ["rl.example"],
                "ratelimit": {"messages": ["4/1h"]},
            },
            {"name": "bulk", "networks": [f"{corpus.BULK}/32"], "domains": ["bulk.example"]},
            {
                "name": "bad",
                "networks": [f"{corpus.BAD}/32"],
                "domains": ["bad.example"],
                "contact": "ops@bad.example",
            },
            {"name": "many", "networks": [f"{corpus.MANY}/32"], "domains": ["many.example"]},
            {
                "name": "listco",
                "networks": [f"{corpus.LISTCO}/32"],
                "domains": ["listco.example"],
                "contact": "ops@listco.example",
            },
        ],
        "ratelimit": {"messages": ["200/1h"], "recipients": ["500/1h"], "same_recipient": ["3/1h"]},
        "bulk": {"threshold": 5, "window": "24h"},
        "sanctions": {
            "ladder": ["warn", "block"],
            "window": "7d",
            "cooldown": "1h",
            "contact": "abuse@hosted.example",
        },
        "dns": {"nameservers": [nameserver], "timeout": "2s"},
        "headers": {"mode": "enforce"},
        "optin": {
            "lists": [
                {
                    "id": "news.acme.example",
                    "customer": "listco",
                    "owner": "news@listco.example",
                    "name": "Acme News",
                    "domain": lists,
                    "return_paths": [f"news-bounces+*@{lists}"],
                    "unsubscribe": [f"news-leave@{lists}"],
                    "consent_text": "Monthly Acme news.",
                }
            ]
        },
    }


def headers_policy(nameserver: str, state: str, **headers: object) -> dict:
    """tests/policy/test_headers.py's policy, which cases.toml is written for."""
    return {
        "server": {"mode": "front", "hostname": "mx.hosted.example", "state": state},
        "postmaster": {"domains": ["hosted.example"], "hostnames": ["host.hosted.example"]},
        "customers": [
            {
                "name": "acme",
                "networks": ["192.0.2.0/24"],
                "logins": ["alice"],
                "domains": ["acme.example"],
                "addresses": ["news@partner.example"],
                "permitted": [
                    {
                        "domain": "trusted-partner.example",
                        "granted_by": GRANTOR,
                        "fields": ["from", "reply-to"],
                    }
                ],
            },
            {
                "name": "forwarder",
                "networks": ["198.51.100.0/24"],
                "domains": ["fwd.example"],
                "headers": {"checks": {"from-owner": "tag"}},
            },
        ],
        "dns": {"nameservers": [nameserver], "timeout": "2s"},
        "headers": headers,
    }


# --------------------------------------------------------------------------- normalising

_SUBS = [
    (re.compile(r"confirm\+[a-z2-7]{32}"), "confirm+<TOKEN>"),
    (re.compile(r"\b[0-9A-F]{10,16}\b"), "<ID>"),
    (re.compile(r"queued as \S+"), "queued as <QID>"),
    (re.compile(r"(127\.0\.0\.\d+|localhost)([:\]\[ ]|, port |\.)(\d{4,5})\b"), r"\1\2<PORT>"),
    (re.compile(r"\bport[= ]\d{4,5}\b"), "port=<PORT>"),
    (re.compile(r"maild\[\d+\]"), "maild[<PID>]"),
    (re.compile(r"\b((?:token_)?hash)=[0-9a-f]{8,64}\b"), r"\1=<HASH>"),
    (re.compile(r"\b((?:token_)?hash)=[0-9a-f]{8,64}\b"), r"\1=<HASH>"),
    (re.compile(r"/tmp/[^\s\"',;)]+"), "<TMP>"),
]


def normalise(text: str, tmp: str) -> str:
    text = text.replace(tmp, "<TMP>")
    for pattern, repl in _SUBS:
        text = pattern.sub(repl, text)
    return text


# --------------------------------------------------------------------------- downstream


class Sink:
    """The downstream: aiosmtpd in its own thread; refuses nouser@*, else 250 queued."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.count = 0
        self.messages: list[bytes] = []
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_RCPT(self, server, session, envelope, address, options):  # noqa: ANN001
        if address.lower().startswith("nouser@"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001
        self.count += 1
        self.messages.append(envelope.original_content or envelope.content)
        return f"250 2.0.0 Ok: queued as SINK{self.count:06d}"


# --------------------------------------------------------------------------- the daemon


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _idle(task: asyncio.Task) -> bool:
    """Done, or a long-lived loop's timed wait for its stop event (polls re-create it)."""
    return task.done() or getattr(task.get_coro(), "__qualname__", "") == "Event.wait"


class Running:
    """maild's Daemon in a thread with its own event loop, as `maild serve` runs it."""

    def __init__(self, config) -> None:  # noqa: ANN001
        from maild.components import WIRING
        from maild.daemon import Daemon

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.daemon = Daemon(config, WIRING, shutdown_grace=5, allow_root=os.geteuid() == 0)
        self.call(self.daemon.start())
        self.port = self.daemon.server.sockets[0].getsockname()[1]
        probe = getattr(self.daemon, "_probe", None)  # the start-up downstream check
        if probe is not None:
            self.call(asyncio.wait([probe]))
        self.baseline = self._others()  # the long-lived ones (and start-up's, soon done)

    def call(self, coro, timeout: float = HANG):  # noqa: ANN001, ANN201
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _others(self) -> set[asyncio.Task]:
        """The daemon's tasks other than the caller's."""

        async def others() -> set[asyncio.Task]:
            return asyncio.all_tasks() - {asyncio.current_task()}

        return self.call(others())

    def settle(self) -> None:
        """Until every task started since the daemon was up has finished: sessions and what
        they set off (strikes, notices, store writes) are done, so their log lines are in."""
        deadline = _real_time() + HANG
        while busy := {t for t in self._others() - self.baseline if not _idle(t)}:
            if _real_time() > deadline:
                raise RuntimeError(f"the daemon did not settle: {busy}")
            self.call(asyncio.sleep(0.005))

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.daemon.stop_event.set()
            self.call(self.daemon.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# --------------------------------------------------------------------------- the client

_LINE = re.compile(rb"^(\d{3})([ -])(.*)$")


def read_reply(sock: socket.socket, buf: bytearray) -> str:
    """One complete reply ("" when the server closed)."""
    sock.settimeout(HANG)
    while True:
        lines = bytes(buf).split(b"\r\n")
        for i, line in enumerate(lines[:-1]):
            m = _LINE.match(line)
            if not m:
                raise AssertionError(f"not an SMTP reply: {bytes(buf)!r}")
            if m.group(2) == b" ":
                end = sum(len(x) + 2 for x in lines[: i + 1])
                reply = bytes(buf[:end])
                del buf[:end]
                return reply.decode("latin-1").rstrip("\r\n")
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return "<closed>" if not buf else "<closed> " + bytes(buf).decode("latin-1")
        buf += chunk


def converse(port: int, case: dict) -> list[list[str]]:
    out: list[list[str]] = []
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=HANG, source_address=(case["source"], 0)
    )
    buf = bytearray()
    try:
        out.append(["CONNECT", read_reply(sock, buf)])
        for kind, text in case["steps"]:
            if out[-1][1].startswith(("421", "<closed>")):
                break
            if kind == "data" and not out[-1][1].startswith("354"):
                continue
            payload = {"cmd": text + "\r\n", "data": text, "raw": text, "read": ""}[kind]
            if payload:
                try:
                    sock.sendall(
                        payload.encode("utf-8" if kind == "cmd" else "latin-1", "surrogateescape")
                    )
                except OSError:
                    out.append([kind, "<closed>"])
                    break
            shown = text if kind != "data" else f"<message {len(text)} bytes>"
            out.append([shown, read_reply(sock, buf)])
        # until the server closes (after QUIT, or at once for a 421)
        tail = read_reply(sock, buf)
        if tail != "<closed>":
            out.append(["<after>", tail])
    finally:
        sock.close()
    return out


# --------------------------------------------------------------------------- check-message

_NOW = re.compile(r"\{now(?:([+-]\d+)([hd])|(-0000))?\}")


def corpus_message(name: str) -> bytes:
    """A cases.toml message with its {now...} dates from the fixed clock (LF line ends)."""

    def date(m: re.Match) -> str:
        if m.group(3):
            return time.strftime("%a, %d %b %Y %H:%M:%S -0000", time.gmtime(_now[0]))
        shift = int(m.group(1)) * (3600 if m.group(2) == "h" else 86400) if m.group(1) else 0
        return format_datetime(datetime.fromtimestamp(_now[0] + shift, UTC))

    raw = (corpus.CORPUS / name).read_bytes().decode("utf-8", "surrogateescape")
    return _NOW.sub(date, raw).encode("utf-8", "surrogateescape")


def check_message(case: dict, policy: Path, policy_all: Path, tmp: Path) -> dict:
    from click.testing import CliRunner

    from maild.cli import main

    c = case["case"]
    msg = tmp / c["file"]
    msg.write_bytes(corpus_message(c["file"]))
    args = ["check-message", str(msg), "-c", str(policy_all if c.get("apply_to_all") else policy)]
    customer = c.get("customer", "acme")
    if customer and not c.get("login"):
        args += ["--customer", customer]
    if c.get("login"):
        args += ["--login", c["login"]]
    args += [
        "--client",
        c.get("client", "192.0.2.7"),
        "--helo",
        c.get("helo", "mail.acme.example"),
        "--mail-from",
        c.get("mail_from", "boss@acme.example"),
    ]
    if c.get("smtputf8"):
        args.append("--smtputf8")
    if case["json"]:
        args.append("--json")
    r = CliRunner().invoke(main, args)
    return {"exit": r.exit_code, "output": r.output}


# --------------------------------------------------------------------------- main


def optin_setup(policy: Path) -> list[str]:
    """subscriber@ consented (attested), pending@ asked and not confirmed."""
    from click.testing import CliRunner

    from maild.cli import main

    out = []
    for args in (
        [
            "optin",
            "add",
            "news.acme.example",
            "subscriber@hosted.example",
            "--source",
            "signup form",
            "--obtained",
            "2026-01-05",
            "--actor",
            "golden",
        ],
        ["optin", "request", "news.acme.example", "pending@hosted.example", "--actor", "golden"],
    ):
        r = CliRunner().invoke(main, [*args, "-c", str(policy)])
        out.append(f"{r.exit_code} {r.output.strip()}")
    return out


def run() -> dict:
    results: dict = {"epoch": EPOCH, "cases": []}
    with (
        tempfile.TemporaryDirectory(prefix="maild-golden-") as d,
        DnsServer(ZONE, servfail=STANDARD_SERVFAIL, drop=STANDARD_DROP) as dns_server,
    ):
        tmp = Path(d)
        sink = Sink()
        sink.controller.start()
        capture = Capture()
        root = logging.getLogger("maild")
        root.setLevel(logging.DEBUG)
        root.addHandler(capture)
        smtp_file = tmp / "policies.toml"
        smtp_file.write_text(
            toml(smtp_policy(sink.port, dns_server.nameserver, str(tmp / "maild.db")))
        )
        hdr_file = tmp / "headers.toml"
        hdr_file.write_text(toml(headers_policy(dns_server.nameserver, str(tmp / "h.db"))))
        hdr_all = tmp / "headers-all.toml"
        hdr_all.write_text(
            toml(headers_policy(dns_server.nameserver, str(tmp / "h.db"), apply_to="all"))
        )
        from maild import components

        results["setup"] = [normalise(x, d) for x in optin_setup(smtp_file)]
        daemon = Running(components.load(str(smtp_file)))
        try:
            for case in corpus.cases():
                _now[0] += case.get("advance", 0)
                if capture not in root.handlers:  # the CLI sets up logging afresh
                    root.addHandler(capture)
                    root.setLevel(logging.DEBUG)
                capture.lines.clear()
                row = {"group": case["group"], "name": case["name"]}
                if case["kind"] == "check":
                    r = check_message(case, hdr_file, hdr_all, tmp)
                    row.update(exit=r["exit"], output=normalise(r["output"], d).splitlines())
                else:
                    row["source"] = case["source"]
                    row["replies"] = [
                        [normalise(a, d), normalise(b, d)] for a, b in converse(daemon.port, case)
                    ]
                    daemon.settle()
                row["log"] = [normalise(x, d) for x in capture.lines]
                results["cases"].append(row)
        finally:
            daemon.stop()
            sink.controller.stop()
            root.removeHandler(capture)
    return results


def dump(results: dict) -> str:
    return json.dumps(results, indent=1, ensure_ascii=True, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = dump(run())
    if len(argv) > 1:
        Path(argv[1]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
