"""`[server] workers = 2` when the supervisor goes away: SIGKILL (the OOM killer, a crash)
and SIGTERM (systemd's stop).

The port must stop taking connections as soon as the host stops serving, as one
process's does: a connection the kernel queues on a socket no worker will accept hangs
until the last worker has drained, then is reset; a maild started again (Restart=, runit,
by hand) must be able to bind while the old workers finish their sessions. Mail in
flight is never 250'd without delivery.
"""

from __future__ import annotations

import signal
import smtplib
import socket

from tests.harness.maild import Maild
from tests.harness.waits import wait_until
from tests.integration.test_workers import alive, policy, running, send


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
            assert "stats not sent" not in md.log()  # no error line a second meanwhile
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
