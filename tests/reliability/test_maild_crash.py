"""maild itself is killed with SIGKILL (no shutdown code runs) and started again.

What must hold: a client never heard 250 for a message that is not delivered (maild
answers 250 only after Postfix queued it), a client whose session died retries and gets
exactly one copy through, the state database survives (SQLite WAL; integrity_check), the
decision rows flushed before the crash are kept, a stale pid file does not stop the
restart, and rate-limit counters persisted before the crash still limit after it, so a
crash (or a crash loop) is no way around a limit.
"""

from __future__ import annotations

import signal
import sqlite3

from tests.integration.conftest import CUSTOMER_IP, HOSTED, STRANGER, front_policy
from tests.reliability.helpers import (
    attempt,
    copies,
    decision_rows,
    final_reply,
    in_sleep,
    message,
    open_in_data,
    reinject_smtpd_pids,
    relay_sessions_for,
    settle,
    unique_subject,
    wait_for,
)

RCPT = "rcpt@hosted.example"


def kill9(m) -> None:
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(10)


def test_sigkill_mid_data_then_restart_delivers_exactly_once(
    postfix_factory, maild_factory, tmp_path
):
    pf = postfix_factory(hosted_domains=HOSTED)
    policy = front_policy(pf.reinject_port, pid_file=str(tmp_path / "maild.pid"))
    m = maild_factory(policy)
    db = m.root / "state.db"
    warm = unique_subject("before-crash")
    a = attempt(
        m.port, sender=f"{warm}@outside.example", rcpts=[RCPT], data=message(warm), source=STRANGER
    )
    assert a.accepted, a
    wait_for(lambda: relay_sessions_for(db, f"{warm}@outside.example"), "the decision row")

    subj = unique_subject("crash-mid-data")
    sender = f"{subj}@outside.example"
    s = open_in_data(m.port, STRANGER, sender, RCPT)
    body = message(subj, body=b"line\r\n" * 1000)
    s.sendall(body[: len(body) // 2])
    old_pid = m.proc.pid
    kill9(m)
    code, why = final_reply(s)
    s.close()
    assert code is None, f"a reply came from a dead maild: {why!r}"

    m = maild_factory.restart(m)
    assert (tmp_path / "maild.pid").read_text().strip() == str(m.proc.pid) != str(old_pid)
    a = attempt(m.port, sender=sender, rcpts=[RCPT], data=body + b"\r\n", source=STRANGER)
    assert a.accepted, a
    settle(pf)
    assert copies(pf, RCPT, subj) == 1
    assert copies(pf, RCPT, warm) == 1
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        con.close()
    wait_for(lambda: relay_sessions_for(db, sender), "the retried message's decision row")
    assert len(relay_sessions_for(db, f"{warm}@outside.example")) == 1
    assert len(relay_sessions_for(db, sender)) == 1


def test_sigkill_while_downstream_holds_the_final_dot_loses_nothing(postfix_factory, maild_factory):
    """The in-doubt window: maild sent the final dot and Postfix has not answered yet when
    maild dies. Postfix commits the message anyway, the client saw no reply and retries.
    Nothing may be lost; the retry makes a second copy, which no SMTP relay can avoid in
    this window (RFC 1047): the test records that count and asserts no loss."""
    pf = postfix_factory(
        hosted_domains=HOSTED,
        reinject_options={"smtpd_end_of_data_restrictions": "sleep 3, permit"},
    )
    m = maild_factory(front_policy(pf.reinject_port))
    subj = unique_subject("in-doubt")
    sender = f"{subj}@outside.example"
    s = open_in_data(m.port, STRANGER, sender, RCPT)
    s.sendall(message(subj) + b"\r\n.\r\n")
    wait_for(
        lambda: any(in_sleep(p) for p in reinject_smtpd_pids(pf)),
        "Postfix to hold the complete message",
    )
    kill9(m)
    code, why = final_reply(s)
    s.close()
    assert code is None, why
    m = maild_factory.restart(m)
    a = attempt(m.port, sender=sender, rcpts=[RCPT], data=message(subj), source=STRANGER)
    assert a.accepted, a
    settle(pf)
    n = copies(pf, RCPT, subj)
    assert 1 <= n <= 2, n


def test_rate_limit_counters_survive_sigkill(postfix_factory, maild_factory):
    """acme may send 3 messages an hour. It sends 3, maild persists the counters (every
    ~6 s), dies, restarts: the 4th message is still refused with 450 4.7.1."""
    pf = postfix_factory(hosted_domains=HOSTED)
    policy = front_policy(pf.reinject_port)
    policy["ratelimit"] = {"messages": ["3/1h"]}
    m = maild_factory(policy)
    db = m.root / "state.db"
    for i in range(3):
        subj = unique_subject(f"quota{i}")
        a = attempt(
            m.port,
            sender="boss@acme.example",
            rcpts=["partner@outside.example"],
            data=message(subj),
            source=CUSTOMER_IP,
        )
        assert a.accepted, a
    over = attempt(
        m.port,
        sender="boss@acme.example",
        rcpts=["partner@outside.example"],
        data=message(unique_subject("quota-over")),
        source=CUSTOMER_IP,
    )
    assert over.final == 450 and "4.7.1" in over.text, over

    def persisted() -> bool:
        rows = decision_rows(
            db, "SELECT value FROM ratelimit_counters WHERE key = ?", ("cust:acme#1h",)
        )
        return bool(rows) and rows[0][0] >= 2.99

    wait_for(persisted, "the counters to be persisted", timeout=20)
    kill9(m)
    m = maild_factory.restart(m)
    m.wait_log("antispam: counters=")
    again = attempt(
        m.port,
        sender="boss@acme.example",
        rcpts=["partner@outside.example"],
        data=message(unique_subject("quota-after-crash")),
        source=CUSTOMER_IP,
    )
    assert again.final == 450 and "4.7.1" in again.text, again
    # strangers' inbound mail is not affected by acme's limit
    ok = attempt(
        m.port,
        sender="x@outside.example",
        rcpts=[RCPT],
        data=message(unique_subject("inbound")),
        source=STRANGER,
    )
    assert ok.accepted, ok
