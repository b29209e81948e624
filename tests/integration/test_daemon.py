"""`maild serve` as systemd runs it: readiness, SIGHUP reload, graceful stop, decision log."""

from __future__ import annotations

import json
import signal
import socket
import time

from tests.harness.clients import swaks
from tests.harness.maild import Maild
from tests.harness.waits import patience
from tests.integration.conftest import STRANGER, front_policy, smtp


def test_sighup_reloads_policy_without_dropping_sessions(postfix, tmp_path):
    m = Maild(tmp_path / "m", front_policy(postfix.reinject_port))
    with m:
        s = smtp(m.port)  # a session open across the reload
        r = swaks(m.port, frm="a@newcust.example", to="x@outside.example", bind=STRANGER)
        assert r.rcpt_codes and r.rcpt_codes[0] == 554
        m.policy["customers"].append({"name": "newcust", "networks": [f"{STRANGER}/32"]})
        m.write()
        m.signal(signal.SIGHUP)
        m.wait_log("reload: policy reloaded")
        r = swaks(m.port, frm="a@newcust.example", to="x@outside.example", bind=STRANGER)
        assert r.data_code == 250, r.output
        # the session opened before the reload still works
        s.mail("a@outside.example")
        assert s.rcpt("bob@hosted.example")[0] == 250
        assert s.data(b"Subject: old session\r\n\r\nx\r\n")[0] == 250
        s.quit()
        # a broken file on reload is refused and the running policy kept
        m.config.write_text("[server\n")
        m.signal(signal.SIGHUP)
        m.wait_log("reload refused, keeping the running policy")
        assert (
            swaks(m.port, frm="a@newcust.example", to="y@outside.example", bind=STRANGER).data_code
            == 250
        )


def test_ready_notification_and_graceful_stop(postfix, tmp_path, monkeypatch):
    sock_path = tmp_path / "notify.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(sock_path))
    rx.settimeout(15)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    m = Maild(
        tmp_path / "m", front_policy(postfix.reinject_port, pid_file=str(tmp_path / "maild.pid"))
    )
    m.start()
    try:
        assert rx.recv(1000).startswith(b"READY=1")
        pid = int((tmp_path / "maild.pid").read_text())
        assert pid == m.proc.pid
        m.signal(signal.SIGHUP)
        assert rx.recv(1000) == b"RELOADING=1"
        assert rx.recv(1000) == b"READY=1"
    finally:
        rc = m.stop()
    assert rc == 0
    assert rx.recv(1000) == b"STOPPING=1"
    assert not (tmp_path / "maild.pid").exists()
    rx.close()


def test_an_8bit_address_is_logged_escaped_and_the_decision_log_goes_on(postfix, tmp_path):
    """RFC 5321 allows 8-bit bytes on the wire; syslog and the state store take only UTF-8.
    The refusal is logged with the byte as \\xff, and later decisions are still written."""
    with Maild(tmp_path / "m", front_policy(postfix.reinject_port)) as m:
        with socket.create_connection(
            ("127.0.0.1", m.port), timeout=30, source_address=(STRANGER, 0)
        ) as s:
            f = s.makefile("rb")
            f.readline()
            for line in (
                b"EHLO client.example",
                b"MAIL FROM:<a@outside.example>",
                b"RCPT TO:<\xff@outside.example>",
                b"QUIT",
            ):
                s.sendall(line + b"\r\n")
                while (reply := f.readline())[3:4] == b"-":
                    pass
                if line.startswith(b"RCPT"):  # 8-bit, not UTF-8 (RFC 6531 3.3)
                    assert reply.startswith(b"553 5.6.7"), reply
        swaks(m.port, frm="a@outside.example", to="bob@hosted.example", bind=STRANGER)
        deadline = time.monotonic() + patience(10)
        while time.monotonic() < deadline:
            rows = json.loads(m.cli("log", "--json").stdout)
            if len(rows) >= 2:
                break
            time.sleep(0.3)
        recipients = {(r["action"], r["recipient"]) for r in rows}
        assert ("reject", "\\xff@outside.example") in recipients, rows
        assert ("relay", "bob@hosted.example") in recipients, rows
        assert "to=<\\xff@outside.example>" in m.log()


def test_decisions_are_in_the_store_for_maild_log(postfix, tmp_path):
    with Maild(tmp_path / "m", front_policy(postfix.reinject_port)) as m:
        swaks(m.port, frm="a@outside.example", to="bob@hosted.example", bind=STRANGER)
        swaks(m.port, frm="a@outside.example", to="evil@outside.example", bind=STRANGER)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = json.loads(m.cli("log", "--json").stdout)
            if len(rows) >= 2:
                break
            time.sleep(0.3)
        actions = {(r["action"], r["rule"], r["recipient"]) for r in rows}
        assert ("relay", "-", "bob@hosted.example") in actions
        assert ("reject", "relay", "evil@outside.example") in actions
        rejects = json.loads(m.cli("log", "--json", "--rule", "relay").stdout)
        assert [r["code"] for r in rejects] == [554]
