"""`[server] workers = 2` when the supervisor goes away: SIGKILL (the OOM killer, a crash)
and SIGTERM (systemd's stop).

The port must stop taking connections as soon as the host stops serving, as one
process's does: a connection the kernel queues on a socket no worker will accept hangs
until the last worker has drained, then is reset; a maild started again (Restart=, runit,
by hand) must be able to bind while the old workers finish their sessions. Mail in
flight is never 250'd without delivery.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess

import pytest

from tests.harness.maild import Maild
from tests.harness.postgres import Postgres, need_postgres
from tests.harness.waits import wait_until
from tests.integration.test_workers import (
    LIMIT,
    LIMITED,
    _children,
    alive,
    in_parallel,
    pids_with,
    policy,
    running,
    send,
    status,
)


def refused(port: int) -> bool:
    """A connection to the port is refused (or reset before the greeting)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(100) == b""
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    except OSError:  # connected, no greeting: queued where nobody accepts
        return False


def half_sent(port: int, tag: str) -> smtplib.SMTP:
    """A customer session in the middle of DATA."""
    s = smtplib.SMTP(
        "127.0.0.1",
        port,
        local_hostname="client.acme.example",
        timeout=30,
        source_address=("127.0.0.9", 0),
    )
    s.ehlo("client.acme.example")
    assert s.mail("boss@acme.example")[0] == 250
    assert s.rcpt(f"{tag}@outside.example")[0] == 250
    assert s.docmd("DATA")[0] == 354
    s.send(f"Subject: {tag}\r\n\r\nthe body of {tag}\r\n".encode())
    return s


def finish(s: smtplib.SMTP) -> int:
    """End the DATA; the reply code, 0 if the connection dropped."""
    try:
        s.send(b".\r\n")
        code = s.getreply()[0]
    except (smtplib.SMTPServerDisconnected, ConnectionError):
        return 0
    s.close()
    return code


def test_a_killed_supervisor_frees_the_port_at_once_and_a_new_maild_binds_it(postfix, tmp_path):
    md = Maild(tmp_path / "m", policy(postfix.reinject_port))
    md.start()
    try:
        assert wait_until(lambda: len(running(md)) == 2, timeout=20)
        workers = running(md)
        s = half_sent(md.port, "orphan")
        assert md.proc is not None
        md.proc.kill()
        md.proc.wait()
        # the workers stop accepting and so does the port, while one still has a session
        assert wait_until(lambda: refused(md.port), timeout=15), "the port still queues"
        again = Maild(tmp_path / "m", policy(postfix.reinject_port), port=md.port)
        again.start()  # binds while the old worker drains
        try:
            assert wait_until(lambda: len(running(again)) == 2, timeout=20)
            # the orphaned session, still served, is tempfailed: its worker cannot check
            # it any more
            assert finish(s) == 451
            assert wait_until(lambda: not any(alive(p) for p in workers), timeout=20)
            log = md.log()
            assert "not sent" not in log  # no error line a second meanwhile, one line:
            assert "the supervisor is gone; listeners shut down, sessions in flight 1" in log
            before = len(postfix.outside_messages())
            assert send(again, 1, "127.0.0.9") == 250
            got = postfix.wait_for_outside(before + 1)
            assert not any(b"the body of orphan" in x for x in got)
        finally:
            again.stop()
    finally:
        md.stop()


def test_sigterm_lets_sessions_finish_and_refuses_new_connections_meanwhile(postfix, tmp_path):
    md = Maild(tmp_path / "m", policy(postfix.reinject_port))
    md.start()
    try:
        assert wait_until(lambda: len(running(md)) == 2, timeout=20)
        before = len(postfix.outside_messages())
        s = half_sent(md.port, "draining")
        md.signal(signal.SIGTERM)
        # a new client is refused (it tries the next MX) instead of waiting in a backlog
        assert wait_until(lambda: refused(md.port), timeout=15), "the port still queues"
        assert finish(s) == 250  # the session in flight finishes and is delivered
        got = postfix.wait_for_outside(before + 1)
        assert sum(b"the body of draining" in x for x in got) == 1
        assert md.proc is not None and md.proc.wait(timeout=60) == 0
    finally:
        md.stop()


@pytest.fixture(scope="module")
def pg():
    server = Postgres(need_postgres()).start()
    yield server
    server.remove()


def locks_on(pg: Postgres, db: str, table: str, granted: bool) -> int:
    return int(
        pg.psql(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            f"WHERE c.relname = '{table}' AND l.granted = {str(granted).lower()}",
            db,
        ).strip()
    )


def test_a_reload_while_a_worker_starts_is_in_force_in_it_once_it_listens(pg, postfix, tmp_path):
    """Worker 1 is killed and, restarting, waits in its first read of the state store (a
    lock the test holds on the sanctions table) when the policy is reloaded: once it
    listens it runs the new policy, as the running worker does."""
    db = "workers_reload"
    p = policy(postfix.reinject_port)
    p["server"]["state"] = pg.create_db(db)
    md = Maild(tmp_path / "m", p)
    md.start()
    holder = None
    try:
        assert wait_until(lambda: len(running(md)) == 2, timeout=20)
        shares = status(md)["limits"]["admission"]["max_sessions"]
        holder = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", f"{pg.bindir}/psql", "-h", str(pg.sock)]
            + ["-p", str(pg.port), "-d", db, "-q", "-v", "ON_ERROR_STOP=1"],
            stdin=subprocess.PIPE,
            text=True,
        )
        assert holder.stdin is not None
        holder.stdin.write("BEGIN;\nLOCK TABLE sanctions IN ACCESS EXCLUSIVE MODE;\n")
        holder.stdin.flush()
        assert wait_until(lambda: locks_on(pg, db, "sanctions", True), timeout=20)
        victim = running(md)[1]
        os.kill(victim, signal.SIGKILL)
        md.wait_log(f"(pid {victim}) died")
        # the new worker 1 got the policy ("hello") and waits for the table
        assert wait_until(lambda: locks_on(pg, db, "sanctions", False), timeout=20)
        md.policy["server"]["limits"] = {"max_sessions": 40}
        assert shares != 40
        md.write()
        r = md.cli("reload")
        assert "did not apply it" not in r.stderr, r.stderr
        assert r.returncode == 0, r.stdout + r.stderr
        holder.stdin.write("COMMIT;\n")
        holder.stdin.close()
        holder.wait(timeout=30)
        assert wait_until(lambda: len(running(md)) == 2, timeout=20)
        # 20 + 20: the restarted worker enforces its share of the new limit too
        assert wait_until(
            lambda: status(md)["limits"]["admission"]["max_sessions"] == 40, timeout=20
        ), status(md)["limits"]["admission"]
        assert "did not apply it" not in md.log()
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
        md.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_rate_limit_is_exact_on_postgresql_in_one_process_as_across_workers(
    pg, postfix, tmp_path, workers
):
    """Sessions at once, on the shared (PostgreSQL) counters: exactly the limit admitted.
    Concurrent syncs of one key must not each send the same unsynced increments."""
    p = policy(postfix.reinject_port)
    p["server"].update(state=pg.create_db(f"workers_limit_{workers}"), workers=workers)
    md = Maild(tmp_path / "m", p)
    with md:
        if workers > 1:
            assert wait_until(lambda: len(running(md)) == workers, timeout=20)
        codes = in_parallel(lambda i: send(md, i, LIMITED, "a@limited.example"), 2 * LIMIT)
        assert codes.count(250) == LIMIT, codes
        if workers > 1:
            assert pids_with(md, "relay") == set(running(md))


def test_killed_workers_release_what_their_sessions_reserved(postfix, tmp_path):
    """Sessions of a 20/1h customer hold reservations at RCPT; both workers are killed:
    the limit is whole again for the restarted workers (a crash never shrinks it)."""
    md = Maild(tmp_path / "m", policy(postfix.reinject_port))
    with md:
        assert wait_until(lambda: len(running(md)) == 2, timeout=20)
        held = []
        for i in range(5):
            s = smtplib.SMTP(
                "127.0.0.1",
                md.port,
                local_hostname="client.limited.example",
                timeout=30,
                source_address=(LIMITED, 0),
            )
            s.ehlo("client.limited.example")
            assert s.mail("a@limited.example")[0] == 250
            assert s.rcpt(f"held{i}@outside.example")[0] == 250
            held.append(s)
        victims = running(md)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        for pid in victims:
            md.wait_log(f"(pid {pid}) died: killed by signal 9")
        assert wait_until(
            lambda: len(running(md)) == 2 and not set(running(md)) & set(victims), timeout=30
        )
        for s in held:
            s.close()
        codes = in_parallel(lambda i: send(md, 600 + i, LIMITED, "a@limited.example"), LIMIT + 5)
        assert codes.count(250) == LIMIT, codes


def test_a_killed_fork_server_stops_maild_for_a_restart(postfix, tmp_path):
    """Without the fork server no worker can be restarted and no worker's end is heard:
    maild says so, stops its workers and exits 1 (systemd's Restart= brings it back
    whole) instead of running on, silently, with fewer workers at every crash."""
    md = Maild(tmp_path / "m", policy(postfix.reinject_port))
    md.start()
    try:
        assert wait_until(lambda: len(running(md)) == 2, timeout=20)
        workers = running(md)
        assert md.proc is not None
        (forks,) = [p for p in _children(md.proc.pid) if set(_children(p)) == set(workers)]
        os.kill(forks, signal.SIGKILL)
        assert md.proc.wait(timeout=60) == 1
        log = md.log()
        assert f"error: the fork server (pid {forks}) killed by signal 9 (SIGKILL)" in log
        assert "workers cannot be restarted; stopping, for a restart" in log
        for pid in workers:
            assert f"worker {workers.index(pid)} stopped: pid={pid}" in log
        assert wait_until(lambda: not any(alive(p) for p in workers), timeout=20)
    finally:
        md.stop()


def test_a_block_while_a_worker_restarts_is_in_force_in_the_restarted_one(postfix, tmp_path):
    md = Maild(tmp_path / "m", policy(postfix.reinject_port))
    with md:
        assert wait_until(lambda: len(running(md)) == 2, timeout=20)
        victim = running(md)[1]
        os.kill(victim, signal.SIGKILL)
        md.wait_log(f"(pid {victim}) died")
        r = md.cli("customer", "block", "acme", "--reason", "while restarting")
        assert r.returncode == 0, r.stderr
        assert wait_until(lambda: len(running(md)) == 2 and victim not in running(md), timeout=20)
        mark = len(md.log())
        assert in_parallel(lambda i: send(md, 700 + i, "127.0.0.9"), 20) == [554] * 20
        refused_by = {int(p) for p in re.findall(r"maild\[(\d+)\]: \w+: reject:", md.log()[mark:])}
        assert refused_by == set(running(md))
