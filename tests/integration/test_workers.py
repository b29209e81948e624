"""`[server] workers = 2`: a supervisor and two worker processes in front of real Postfix.

Mail from many sessions is served by both workers and delivered once; a rate limit is
exact across them; a block is in effect in every worker when `maild customer block`
returns; a worker killed with SIGKILL is logged and restarted, its client sees a dropped
connection (never a 250 without delivery) and mail keeps flowing; SIGHUP reaches every
worker; `maild status` shows them; SIGTERM stops them all.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import smtplib
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.harness.clients import swaks
from tests.harness.maild import Maild
from tests.harness.waits import wait_until
from tests.integration.conftest import front_policy

LIMITED = "127.0.0.30"
LIMIT = 20


def policy(port: int) -> dict:
    p = front_policy(port, workers=2)
    p["customers"].append(
        {
            "name": "limited",
            "networks": [f"{LIMITED}/32"],
            "domains": ["limited.example"],
            "ratelimit": {"messages": [f"{LIMIT}/1h"]},
        }
    )
    return p


@pytest.fixture()
def m(postfix, tmp_path):
    md = Maild(tmp_path / "m", policy(postfix.reinject_port))
    md.start()
    assert wait_until(lambda: len(running(md)) == 2, timeout=20), status(md)
    yield md
    md.stop()


def status(m: Maild) -> dict:
    """The status file, beside the state (under var/ when the state is on PostgreSQL)."""
    path = m.root / "maild.status.json"
    if not path.exists():
        path = m.root / "var" / "maild.status.json"
    return json.loads(path.read_text())


def running(m: Maild) -> list[int]:
    try:
        st = status(m)
    except (OSError, ValueError):
        return []
    return [w["pid"] for w in st.get("workers", []) if w["state"] == "running"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def pids_with(m: Maild, what: str) -> set[int]:
    """The processes that logged a decision line `SESSION: what:`."""
    return {int(p) for p in re.findall(rf"maild\[(\d+)\]: \w+: {what}:", m.log())}


def send(
    m: Maild, i: int, bind: str, frm: str = "boss@acme.example", body: str | None = None
) -> int:
    """One message in its own session; a body of its own unless given (bulk counts copies)."""
    text = body if body is not None else " ".join(secrets.token_hex(4) for _ in range(60))
    r = swaks(m.port, frm=frm, to=f"w{i}@outside.example", bind=bind, body=text)
    return r.data_code if r.data_code else (r.rcpt_codes or [0])[0]


def in_parallel(fn, n: int, threads: int = 10) -> list:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, range(n)))


def test_sessions_land_in_both_workers_and_each_message_is_delivered_once(postfix, m):
    workers = set(running(m))
    assert m.proc is not None and m.proc.pid not in workers
    before = len(postfix.outside_messages())
    codes = in_parallel(lambda i: send(m, i, "127.0.0.9"), 40)
    assert codes == [250] * 40
    got = postfix.wait_for_outside(before + 40)
    assert len(got) == before + 40  # exactly once: no more arrive
    ids = [re.search(rb"(?m)^Message-Id: (.*)$", x, re.I).group(1) for x in got[before:]]
    assert len(set(ids)) == 40
    # both workers served sessions, and nobody else did
    assert pids_with(m, "relay") == workers
    assert re.search(r"daemon started: .* workers=2 \(pids \d+ \d+\)", m.log())


def test_a_rate_limit_is_exact_across_workers(postfix, m):
    before = len(postfix.outside_messages())
    codes = in_parallel(lambda i: send(m, i, LIMITED, "a@limited.example"), 2 * LIMIT)
    assert codes.count(250) == LIMIT, codes
    assert codes.count(450) == LIMIT, codes
    assert len(postfix.wait_for_outside(before + LIMIT)) == before + LIMIT
    assert pids_with(m, "relay") == set(running(m))  # both workers took part

    def counted() -> bool:  # the supervisor writes its counters every few seconds
        shown = m.cli("customers").stdout.splitlines()
        return any(x.startswith("limited ") and f" {LIMIT} of {LIMIT}/1h" in x for x in shown)

    assert wait_until(counted, timeout=20)


def test_one_campaign_score_for_bulk_detection_across_workers(postfix, m):
    """Copies of one message, one after the other, whichever worker takes each: the
    20th is refused (its Breidbart index 20 reaches the threshold), as in one process."""
    body = "Our spring offer, this week only. " * 20
    mark = len(m.log())
    codes = [send(m, 400 + i, "127.0.0.9", body=body) for i in range(24)]
    assert codes == [250] * 19 + [550] * 5, codes
    assert {int(p) for p in re.findall(r"maild\[(\d+)\]: \w+: relay:", m.log()[mark:])} == set(
        running(m)
    )


def test_a_block_is_in_every_worker_when_the_command_returns(postfix, m):
    r = m.cli("customer", "block", "acme", "--reason", "workers test")
    assert r.returncode == 0, r.stderr
    assert f"applied in the running daemon (pid {m.proc.pid})" in r.stdout
    mark = len(m.log())
    codes = in_parallel(lambda i: send(m, i, "127.0.0.9"), 20)
    assert codes == [554] * 20
    refused_by = {int(p) for p in re.findall(r"maild\[(\d+)\]: \w+: reject:", m.log()[mark:])}
    assert refused_by == set(running(m))
    assert m.cli("customer", "unblock", "acme").returncode == 0
    assert in_parallel(lambda i: send(m, 100 + i, "127.0.0.9"), 20) == [250] * 20


def _worker_holding(m: Maild, client_port: int) -> int:
    """The pid of the process at the server end of the client's connection (ss -tnp)."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( dport = :{client_port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pids = {int(p) for p in re.findall(r"pid=(\d+)", out)}
    pids &= set(running(m))
    assert len(pids) == 1, out
    return pids.pop()


def test_a_killed_worker_loses_no_mail_is_logged_and_restarted(postfix, m):
    before = len(postfix.outside_messages())
    s = smtplib.SMTP(
        "127.0.0.1",
        m.port,
        local_hostname="client.acme.example",
        timeout=30,
        source_address=("127.0.0.9", 0),
    )
    s.ehlo("client.acme.example")
    assert s.mail("boss@acme.example")[0] == 250
    assert s.rcpt("victim@outside.example")[0] == 250
    assert s.docmd("DATA")[0] == 354
    s.send(b"Subject: half\r\n\r\nthe first half of a message\r\n")
    victim = _worker_holding(m, s.sock.getsockname()[1])
    os.kill(victim, signal.SIGKILL)
    # the client sees the connection drop, never a 250
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
        s.send(b".\r\n")
        s.getreply()
    m.wait_log(f"(pid {victim}) died: killed by signal 9 (SIGKILL)")
    assert wait_until(lambda: len(running(m)) == 2 and victim not in running(m), timeout=20)
    w = [w for w in status(m)["workers"] if w["restarts"]]
    assert len(w) == 1 and w[0]["last_exit"] == "killed by signal 9 (SIGKILL)", w
    assert in_parallel(lambda i: send(m, 200 + i, "127.0.0.9"), 10) == [250] * 10
    got = postfix.wait_for_outside(before + 10)
    assert not any(b"the first half of a message" in x for x in got)


def test_sighup_reaches_every_worker_and_a_broken_file_keeps_them_all(postfix, m):
    newcomer = "127.0.0.31"
    assert send(m, 300, newcomer, "x@newcomer.example") != 250  # not a customer: no relay
    m.policy["customers"].append({"name": "newcomer", "networks": [f"{newcomer}/32"]})
    m.write()
    r = m.cli("reload")
    assert r.returncode == 0, r.stdout + r.stderr
    m.wait_log("reload: applied in 2 of 2 workers")
    mark = len(m.log())
    assert in_parallel(lambda i: send(m, 310 + i, newcomer, "x@newcomer.example"), 20) == [250] * 20
    assert {int(p) for p in re.findall(r"maild\[(\d+)\]: \w+: relay:", m.log()[mark:])} == set(
        running(m)
    )
    m.config.write_text(m.config.read_text() + "\n[server.limits]\nmax_sessions = -1\n")
    r = m.cli("reload")
    assert r.returncode != 0 and "max_sessions" in (r.stdout + r.stderr)
    assert in_parallel(lambda i: send(m, 340 + i, newcomer, "x@newcomer.example"), 10) == [250] * 10


def test_status_shows_the_workers_and_sigterm_stops_them_all(postfix, m):
    pids = running(m)
    out = m.cli("status").stdout
    for pid in pids:
        assert re.search(
            rf"(?m)^    worker \d: pid {pid} running, up \d+s, sessions \d+, restarts 0$", out
        ), out
    assert "workers: 2 (auto" not in out and "workers: 2" in out
    doc = m.cli("doctor").stdout
    assert f"2 workers (pids {' '.join(str(p) for p in pids)}), restarts 0" in doc, doc
    supervisor = m.proc.pid
    assert m.stop() == 0
    assert not any(alive(p) for p in [*pids, supervisor])
    log = m.log()
    for pid in pids:
        assert f"(pid {pid}) stopped: exit status 0" in log
    assert log.rstrip().endswith("daemon stopped")


def test_reload_finds_the_supervisor_in_the_process_table(postfix, tmp_path):
    """No status file where the edited policy looks, no pid_file: the CLI looks for the
    `maild serve` of this policies.toml, which the workers' processes share."""
    md = Maild(tmp_path / "m", policy(postfix.reinject_port))
    with md:
        assert wait_until(lambda: len(running(md)) == 2, timeout=20)
        md.policy["server"]["state"] = str(tmp_path / "elsewhere" / "maild.db")
        md.write()
        r = md.cli("reload")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "not in effect until a restart: [server] state" in r.stderr


def test_ready_only_when_every_worker_listens_and_all_run_unprivileged(
    postfix, tmp_path, monkeypatch
):
    """READY=1 (with the workers in STATUS=) after both workers' "started" lines; root
    given up before the fork server, so every process of the tree is the user."""
    if os.geteuid() != 0:
        pytest.skip("needs root to test dropping root")
    import shutil
    import socket
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="maild-workers-", dir="/tmp"))
    d.chmod(0o755)
    sock_path = d / "notify.sock"  # where the unprivileged supervisor can write
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(sock_path))
    sock_path.chmod(0o777)
    rx.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    try:
        p = policy(postfix.reinject_port)
        p["server"].update(user="nobody", state=str(d / "state" / "maild.db"))
        md = Maild(d / "m", p)
        (d / "m").chmod(0o755)
        with md:
            ready = rx.recv(1000).decode()
            assert ready.startswith("READY=1\n"), ready
            assert re.search(
                r"STATUS=2 workers listening on 127\.0\.0\.1:\d+ \(pids \d+, \d+\)", ready
            )
            log = md.log()
            assert "worker 0 started" in log and "worker 1 started" in log
            pids = [int(x) for x in re.findall(r"\d+", ready.split("pids ")[1])]
            tree = [md.proc.pid, *pids, *_children(md.proc.pid)]
            for pid in set(tree):
                uid = [
                    int(x)
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("Uid:")
                    for x in line.split()[1:]
                ]
                assert uid == [65534] * 4, (pid, uid)
            assert send(md, 500, "127.0.0.9") == 250
    finally:
        rx.close()
        shutil.rmtree(d, ignore_errors=True)


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        out.append(int(d))
            except OSError:
                continue
    return out
