"""The README's "Try it" commands, as written, reach a first relayed message without DNS.

The commands are read from README.md's "## Try it" block and run with the ports and the
state file moved where this test process may use them, and with the resolver pointed at
a loopback port where nothing answers: DNS is unavailable, as on a new user's offline
machine. The downstream is the README's (aiosmtpd's debugging server), then a real
Postfix, as the README's variant says (`downstream =` its port).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from tests.harness import require_binary
from tests.harness.clients import SwaksResult, parse_swaks, swaks
from tests.harness.maild import render
from tests.harness.ports import free_port, port_open
from tests.harness.postfix import Postfix
from tests.harness.waits import patience, wait_until
from tests.integration.conftest import HOSTED, need

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the .venv the tests run in: the README's .venv/bin
LISTEN, DOWNSTREAM = "127.0.0.1:2525", "127.0.0.1:2526"


def readme_commands() -> list[list[str]]:
    """The shell lines of the README's "Try it" block, as argument lists ('&' kept)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Try it\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README.md: the Try it section has no ```sh block"
    return [
        argv for line in block.group(1).splitlines() if (argv := shlex.split(line, comments=True))
    ]


def try_it_config(tmp: Path, listen: int, downstream: int) -> Path:
    """examples/try-it.toml with our ports and state, and a resolver that never answers."""
    doc = tomllib.loads((ROOT / "examples" / "try-it.toml").read_text(encoding="utf-8"))
    assert (doc["server"]["listen"], doc["server"]["downstream"]) == (LISTEN, DOWNSTREAM), (
        "the README's commands and examples/try-it.toml name different ports"
    )
    doc["server"].update(
        listen=f"127.0.0.1:{listen}",
        downstream=f"127.0.0.1:{downstream}",
        state=str(tmp / "try-it.db"),
    )
    doc["dns"] = {"nameservers": [f"127.0.0.1:{free_port()}"], "timeout": "1s"}  # no DNS
    path = tmp / "try-it.toml"
    path.write_text(render(doc))
    return path


def localise(argv: list[str], config: Path, listen: int, downstream: int) -> list[str]:
    out = []
    for a in argv:
        a = (
            a.replace("examples/try-it.toml", str(config))
            .replace(LISTEN, f"127.0.0.1:{listen}")
            .replace(DOWNSTREAM, f"127.0.0.1:{downstream}")
        )
        out.append(str(BIN / a[len(".venv/bin/") :]) if a.startswith(".venv/bin/") else a)
    if out[1:2] == ["serve"] and os.geteuid() == 0:
        out.append("--allow-root")  # "as root, add --allow-root"
    return out


def follow_readme(
    tmp: Path, downstream_port: int | None, then: Callable[[int], None] = lambda port: None
) -> tuple[SwaksResult, str, str]:
    """Run the README's lines in order, then `then(maild's port)` while the servers run;
    downstream_port: a Postfix instead of aiosmtpd. Returns swaks' result, `maild log`'s
    output and what the aiosmtpd downstream printed."""
    listen = free_port()
    sink_port = downstream_port or free_port()
    config = try_it_config(tmp, listen, sink_port)
    background: list[tuple[subprocess.Popen, Path]] = []
    swaks_out, log_out = None, None
    try:
        for argv in readme_commands():
            if argv[0] == "make":
                continue  # the .venv these tests run in
            bg = argv[-1] == "&"
            argv = localise(argv[:-1] if bg else argv, config, listen, sink_port)
            if argv[0] == "swaks":
                argv[0] = require_binary("swaks")
            is_sink = "aiosmtpd" in argv
            if is_sink and downstream_port is not None:
                continue  # "leave out the aiosmtpd line"
            if bg:
                out = tmp / f"bg{len(background)}.out"
                with out.open("wb") as f:
                    p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
                background.append((p, out))
                port = sink_port if is_sink else listen
                assert wait_until(lambda p=p, port=port: port_open(port) or p.poll() is not None)
                assert p.poll() is None, out.read_text()
                continue

            def run(argv: list[str] = argv) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    argv,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    cwd=ROOT,
                    env={**os.environ, "HOME": "/nonexistent"},
                )

            r = run()
            if argv[1:2] == ["log"]:
                # decision rows reach the store in batches, a moment after the reply:
                # a person running it again a second later sees the line
                deadline = time.monotonic() + patience(10)
                while "relay:" not in r.stdout and time.monotonic() < deadline:
                    time.sleep(0.5)
                    r = run()
            if argv[0].endswith("swaks"):
                swaks_out = SwaksResult(
                    r.returncode, r.stdout + r.stderr, parse_swaks(r.stdout + r.stderr)
                )
            else:
                assert r.returncode == 0, r.stdout + r.stderr
                log_out = r.stdout
        then(listen)
    finally:
        for p, _ in reversed(background):
            p.terminate()
            p.wait(timeout=30)
    assert swaks_out is not None and log_out is not None, "README: no swaks or maild log line"
    sink = next((out.read_text() for p, out in background if "aiosmtpd" in p.args), "")
    return swaks_out, log_out, sink


def test_readme_try_it_relays_a_first_message_without_dns(tmp_path):
    require_binary("swaks")

    def refusal(port: int) -> None:  # the README's next step: another domain's sender
        r = swaks(port, frm="ceo@bank.example", to="friend@example.org", helo="pc.try.example")
        assert r.rcpt_codes == [553], r.output
        assert (
            "553 5.7.1 Sender address <ceo@bank.example> is not an address of yours" in r.output
            and "(envelope-owner)" in r.output
        ), r.output

    r, log, printed = follow_readme(tmp_path, None, refusal)
    assert r.rcpt_codes == [250] and r.data_code == 250, r.output
    assert "by mail.try.example (maild)" in printed and "From: you@try.example" in printed
    assert re.search(
        r"relay: DATA from \S+\[127\.0\.0\.1\]: 250 .*customer=you "
        r"from=<you@try\.example> to=<friend@example\.org>",
        log,
    ), log


def test_readme_try_it_with_a_local_postfix_downstream(tmp_path):
    need("postfix", "swaks")
    pf = Postfix(tmp_path / "pf", hosted_domains=HOSTED, hostname="host.hosted.example")
    pf.start()
    try:
        r, log, _ = follow_readme(tmp_path, pf.reinject_port)
        assert r.data_code == 250 and "queued as" in (r.data_reply or ""), r.output
        assert "relay: DATA" in log and "customer=you" in log, log
        pf.wait_for_outside(1)
    finally:
        pf.stop()
