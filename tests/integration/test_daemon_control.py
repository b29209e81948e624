"""What the CLI asks of the running `maild serve`, and what it is told back: reload applies
listen and downstream changes live and names what needs a restart; a block or unblock is
in effect when the command returns; a missing downstream is reported at start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

import pytest

from tests.harness.clients import swaks
from tests.harness.maild import Maild
from tests.harness.ports import free_port, port_open
from tests.harness.postfix import Postfix
from tests.harness.waits import wait_until
from tests.integration.conftest import CUSTOMER_IP, HOSTED, STRANGER, front_policy, smtp

REINJECT_FIX = "add the re-injection smtpd to master.cf (docs/postfix.md) and `postfix reload`"


def status(m: Maild) -> dict:
    r = m.cli("status", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def doctor_line(m: Maild, name: str) -> str:
    out = m.cli("doctor").stdout
    return next(line for line in out.splitlines() if line.split()[1:2] == [f"{name}:"])


@pytest.fixture
def second_postfix(tmp_path):
    pf = Postfix(tmp_path / "pf2", hosted_domains=HOSTED, hostname="host.hosted.example")
    pf.start()
    yield pf
    pf.stop()


# ---------------------------------------------------------------------- item 9: reload


def test_reload_moves_listen_and_downstream_and_sessions_in_flight_finish(
    postfix, second_postfix, tmp_path
):
    m = Maild(tmp_path / "m", front_policy(postfix.reinject_port))
    with m:
        old_port = m.port
        s = smtp(old_port)  # a transaction open across the reload: its downstream is the old one
        s.mail("a@outside.example")
        assert s.rcpt("reload-old@hosted.example")[0] == 250
        new_port = free_port()
        m.policy["server"].update(
            listen=f"127.0.0.1:{new_port}", downstream=f"127.0.0.1:{second_postfix.reinject_port}"
        )
        m.write()
        r = m.cli("reload")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"listen now 127.0.0.1:{new_port}" in r.stdout, r.stdout
        assert f"downstream now 127.0.0.1:{second_postfix.reinject_port}" in r.stdout, r.stdout
        # the session accepted on the old socket finishes on the old downstream
        assert s.data(b"Subject: begun before the reload\r\n\r\nx\r\n")[0] == 250
        s.quit()
        assert postfix.wait_for_messages("reload-old@hosted.example", 1)
        # new sessions: the new socket, the new downstream; the old socket is closed
        assert not port_open(old_port)
        r2 = swaks(new_port, frm="a@outside.example", to="reload-new@hosted.example", bind=STRANGER)
        assert r2.data_code == 250, r2.output
        assert second_postfix.wait_for_messages("reload-new@hosted.example", 1)
        assert postfix.messages("reload-new@hosted.example") == []
        st = status(m)
        assert st["listen"] == f"127.0.0.1:{new_port}"
        assert st["downstream"] == f"127.0.0.1:{second_postfix.reinject_port}"
        assert st["restart_needed"] == []
        m.port = new_port  # for the harness's own checks at stop
        # the downstream was checked at start and at the reload, and answered both times
        for pf in (postfix, second_postfix):
            m.wait_log(
                f"downstream: 127.0.0.1:{pf.reinject_port} answers EHLO and authorises XFORWARD"
            )
        assert "warning: downstream" not in m.log()


@pytest.mark.parametrize("pid_file", [True, False], ids=["pid-file", "process-table"])
def test_reload_names_a_state_change_that_needs_a_restart_and_exits_1(postfix, tmp_path, pid_file):
    # The status file lives beside the old state: the command finds the daemon by its
    # pid_file, or else as the `maild serve` process of this policies.toml.
    server = {"pid_file": str(tmp_path / "maild.pid")} if pid_file else {}
    m = Maild(tmp_path / "m", front_policy(postfix.reinject_port, **server))
    with m:
        running = str(tmp_path / "m" / "state.db")
        elsewhere = tmp_path / "elsewhere" / "maild.db"
        m.policy["server"]["state"] = str(elsewhere)
        m.write()
        r = m.cli("reload")
        assert r.returncode == 1, r.stdout + r.stderr
        assert (
            f"not in effect until a restart: [server] state = {elsewhere} (running: {running})"
            in r.stderr
        ), r.stderr
        assert "restart maild" in r.stderr
        # `maild status` with the edited file still finds the daemon, and shows what runs
        st = status(m)
        assert st["state"] == running
        assert [x["key"] for x in st["restart_needed"]] == ["state"]
        assert "not in effect until a restart: [server] state" in m.cli("status").stdout
        # the policy part of the reload was applied and mail flows on the running store
        r = swaks(m.port, frm="a@outside.example", to="bob@hosted.example", bind=STRANGER)
        assert r.data_code == 250, r.output
        assert not elsewhere.exists()


def test_reload_names_a_web_listener_change_that_needs_a_restart(postfix, tmp_path):
    old, new = free_port(), free_port()
    policy = front_policy(postfix.reinject_port)
    policy["web"] = {
        "enabled": True,
        "listen": f"127.0.0.1:{old}",
        "base_url": f"http://127.0.0.1:{old}",
    }
    m = Maild(tmp_path / "m", policy)
    with m:
        m.policy["web"]["listen"] = f"127.0.0.1:{new}"
        m.write()
        r = m.cli("reload")
        assert r.returncode == 1, r.stdout + r.stderr
        pending = f"[web] listen = 127.0.0.1:{new} (running: 127.0.0.1:{old})"
        assert f"not in effect until a restart: {pending}" in r.stderr, r.stderr
        assert f"not in effect until a restart: {pending}" in m.cli("status").stdout
        assert (
            f"warning: reload: {pending.replace(' (running', ' is not in effect (running')}"
            in m.log()
        )
        assert port_open(old) and not port_open(new)  # the running listener stays


def _free_privileged_port() -> int:
    for port in range(1023, 900, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


def test_reload_to_a_privileged_port_after_dropping_root_says_so(postfix):
    if os.geteuid() != 0:
        pytest.skip("needs root to test dropping root")
    d = Path(tempfile.mkdtemp(prefix="maild-ctl-", dir="/tmp"))
    d.chmod(0o755)
    try:
        policy = front_policy(
            postfix.reinject_port, user="nobody", state=str(d / "state" / "maild.db")
        )
        m = Maild(d / "m", policy)
        (d / "m").chmod(0o755)
        with m:
            port = _free_privileged_port()
            m.policy["server"]["listen"] = f"127.0.0.1:{port}"
            m.write()
            r = m.cli("reload")
            assert r.returncode == 1, r.stdout + r.stderr
            assert f"[server] listen = 127.0.0.1:{port} (running: 127.0.0.1:{m.port})" in r.stderr
            assert (
                "a port below 1024 needs root, which maild gave up after binding at start"
                in r.stderr
            ), r.stderr
            # still listening where it was
            assert (
                swaks(
                    m.port, frm="a@outside.example", to="bob@hosted.example", bind=STRANGER
                ).data_code
                == 250
            )
            line = doctor_line(m, "listen")
            assert (
                f"the running daemon (pid {m.proc.pid}) uses listen 127.0.0.1:{m.port}, not "
                f"the file's 127.0.0.1:{port}: restart maild" in line
            ), line
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_doctor_says_which_downstream_the_daemon_uses(postfix, tmp_path):
    m = Maild(tmp_path / "m", front_policy(postfix.reinject_port))
    with m:
        closed = free_port()
        m.policy["server"]["downstream"] = f"127.0.0.1:{closed}"
        m.write()  # edited, not reloaded
        line = doctor_line(m, "downstream")
        assert line.startswith(f"FAIL downstream: cannot reach 127.0.0.1:{closed}"), line
        assert (
            f"the running daemon (pid {m.proc.pid}) uses downstream "
            f"127.0.0.1:{postfix.reinject_port}, not the file's 127.0.0.1:{closed}: "
            "`maild reload` applies the file" in line
        ), line
        # reloading applies it, and says at once that nothing answers there
        r = m.cli("reload")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"warning: cannot reach 127.0.0.1:{closed}" in r.stderr, r.stderr
        assert REINJECT_FIX in r.stderr
        assert "the running daemon" not in doctor_line(m, "downstream")


# ---------------------------------------------------------------------- item 10: sanctions


def test_block_and_unblock_are_in_effect_when_the_command_returns(postfix, tmp_path):
    policy = front_policy(postfix.reinject_port)
    m = Maild(tmp_path / "m", policy)

    def send(to: str):
        return swaks(m.port, frm="boss@acme.example", to=to, bind=CUSTOMER_IP)

    with m:
        assert send("before@outside.example").data_code == 250
        r = m.cli("customer", "block", "acme", "--reason", "complaints")
        assert r.returncode == 0, r.stderr
        assert (
            r.stdout.strip()
            == f"customer acme: blocked; applied in the running daemon (pid {m.proc.pid})"
        )
        res = send("right-after-block@outside.example")  # no waiting: the block is in effect
        assert res.rcpt_codes == [554], res.output
        r = m.cli("customer", "unblock", "acme")
        assert r.returncode == 0 and "applied in the running daemon" in r.stdout, r.stdout
        assert send("right-after-unblock@outside.example").data_code == 250
        r = m.cli("ratelimit", "reset", "acme", "--json")
        assert json.loads(r.stdout)["effect"] == f"applied in the running daemon (pid {m.proc.pid})"
        # a daemon that cannot answer: the change is recorded, the command says so and fails
        m.signal(signal.SIGSTOP)
        try:
            r = m.cli("customer", "block", "acme", "--reason", "while stopped")
        finally:
            m.signal(signal.SIGCONT)
        assert r.returncode == 1
        assert f"recorded, but the running daemon (pid {m.proc.pid}) did not confirm it" in r.stderr
        assert wait_until(lambda: send("later@outside.example").rcpt_codes == [554])
    # no daemon: said so, and the block holds from the start
    r = m.cli("customer", "unblock", "acme")
    assert r.returncode == 0
    assert (
        r.stdout.strip()
        == "customer acme: ok; the daemon is not running: takes effect when it starts"
    )
    with m:
        assert send("after-start@outside.example").data_code == 250


# ---------------------------------------------------------------------- item 11: start-up


def test_start_warns_when_nothing_listens_downstream_and_keeps_running(tmp_path):
    port = free_port()
    m = Maild(tmp_path / "m", front_policy(port))
    with m:
        text = m.wait_log(f"warning: downstream at start: cannot reach 127.0.0.1:{port}")
        line = next(x for x in text.splitlines() if "warning: downstream at start" in x)
        assert "mail is tempfailed (451 4.4.1) until it answers" in line, line
        assert f"fix: {REINJECT_FIX}" in line, line
        assert status(m)["running"]
        # once Postfix listens there, mail flows without a restart
        pf = Postfix(
            tmp_path / "pf",
            hosted_domains=HOSTED,
            reinject_port=port,
            hostname="host.hosted.example",
        )
        with pf:
            r = swaks(m.port, frm="a@outside.example", to="bob@hosted.example", bind=STRANGER)
            assert r.data_code == 250, r.output
            assert pf.wait_for_messages("bob@hosted.example", 1)


def test_start_warns_when_the_downstream_does_not_offer_xforward(tmp_path):
    pf = Postfix(
        tmp_path / "pf",
        hosted_domains=HOSTED,
        hostname="host.hosted.example",
        reinject_options={"smtpd_authorized_xforward_hosts": "192.0.2.1"},
    )
    with pf, Maild(tmp_path / "m", front_policy(pf.reinject_port)) as m:
        text = m.wait_log("warning: downstream at start:")
        assert (
            f"127.0.0.1:{pf.reinject_port} answers EHLO but does not offer XFORWARD to maild; "
            "fix: add -o smtpd_authorized_xforward_hosts=127.0.0.0/8" in text
        ), text
