"""The state database fails under a running maild: locked, read-only, on a full filesystem.

No rule on the SMTP path waits on the store (decision rows are batched every 0.5 s,
rate-limit counters persisted every ~6 s, strikes written from tasks), but once a write
fails maild answers 451 4.3.0 until a write succeeds (docs/reliability.md says what must
be durable before 250). What the tests hold maild to, for each fault:

* every client hears 250 (then exactly one copy is delivered) or 4xx (nothing delivered,
  and the retry after the store is healthy delivers exactly one copy): never a 5xx, never
  a 250 without a delivery;
* maild stays up, and once the store works again, by itself, it writes every decision
  row it kept, exactly once (no row lost, none written twice by a half-failed batch), and
  the rate-limit counters it could not persist.

The faults are real: another process holding SQLite's write lock (BEGIN EXCLUSIVE),
`chattr +i` (which even root and already-open descriptors cannot write through), and a
size-limited tmpfs filled to ENOSPC.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import CUSTOMER_IP, HOSTED, STRANGER, front_policy
from tests.reliability.helpers import (
    Attempt,
    attempt,
    chattr,
    copies,
    decision_rows,
    fill,
    message,
    settle,
    tmpfs,
    unique_subject,
    wait_for,
)

RCPT = "rcpt@hosted.example"
OUTSIDE = "partner@outside.example"


def send_batch(port: int, tag: str, n: int) -> list[tuple[str, str, str, Attempt]]:
    """n inbound messages from a stranger and n outbound ones from customer acme."""
    out = []
    for i in range(n):
        subj = unique_subject(f"{tag}-in{i}")
        sender = f"{subj}@outside.example"
        out.append(
            (
                subj,
                sender,
                RCPT,
                attempt(port, sender=sender, rcpts=[RCPT], data=message(subj), source=STRANGER),
            )
        )
        subj = unique_subject(f"{tag}-out{i}")
        sender = f"{subj}@acme.example"
        out.append(
            (
                subj,
                sender,
                OUTSIDE,
                attempt(
                    port, sender=sender, rcpts=[OUTSIDE], data=message(subj), source=CUSTOMER_IP
                ),
            )
        )
    return out


def wait_recovered(m) -> None:
    """Until maild's last word on its store is that it takes writes again (a write
    succeeded after the repair: at most one heartbeat round, 2 s, after it)."""

    def recovered() -> bool:
        said = [
            line
            for line in m.log().splitlines()
            if "state store: unavailable" in line or "state store: available again" in line
        ]
        return bool(said) and "available again" in said[-1]

    wait_for(recovered, "state store: available again", timeout=20)


def outside_copies(pf, needle: str) -> int:
    return sum(needle.encode() in m for m in pf.outside_messages())


def exercise(
    pf, m, db: Path, break_store: Callable[[], None], heal: Callable[[], None], n: int = 4
) -> dict[str, int]:
    """Break the store, send mail, heal it, and check the whole contract; returns numbers."""
    warm = send_batch(m.port, "warm", 1)
    assert all(a.accepted for *_, a in warm), [str(a) for *_, a in warm]
    wait_for(
        lambda: len(decision_rows(db, "SELECT 1 FROM decisions WHERE action='relay'")) >= 2,
        "warm-up decision rows",
    )
    break_store()
    sent = send_batch(m.port, "broken", n)
    for _subj, _sender, _rcpt, a in sent:
        assert a.accepted or a.temporary, f"refused for good while the store was broken: {a}"
    m.wait_log("decision log: cannot write", timeout=20)
    assert m.proc.poll() is None, "maild died with its store"
    # once maild knows, nothing more is accepted until the store takes writes
    late = send_batch(m.port, "late", 1)
    for *_, a in late:
        assert a.final == 451 and a.text.startswith("4.3.0"), a
    numbers = {
        "messages": len(sent),
        "accepted_while_broken": sum(a.accepted for *_, a in sent),
        "tempfailed_once_known": len(late),
    }
    sent += late
    heal()
    wait_recovered(m)
    for subj, sender, rcpt, a in sent:
        if not a.accepted:  # the client's retry, now that the store works
            b = attempt(
                m.port,
                sender=sender,
                rcpts=[rcpt],
                data=message(subj),
                source=STRANGER if rcpt == RCPT else CUSTOMER_IP,
            )
            assert b.accepted, b
    settle(pf)
    for subj, _sender, rcpt, _a in warm + sent:
        n_copies = copies(pf, RCPT, subj) if rcpt == RCPT else outside_copies(pf, subj)
        assert n_copies == 1, (subj, n_copies)

    senders = [sender for _s, sender, _r, _a in warm + sent]

    def relay_rows() -> dict[str, int]:
        rows = decision_rows(
            db, "SELECT sender, COUNT(*) FROM decisions WHERE action = 'relay' GROUP BY sender"
        )
        return {s: c for s, c in rows if s in senders}

    wait_for(
        lambda: len(relay_rows()) == len(senders), "every decision row to be written", timeout=30
    )
    counts = relay_rows()
    assert all(c == 1 for c in counts.values()), {s: c for s, c in counts.items() if c != 1}
    wait_for(
        lambda: decision_rows(
            db,
            "SELECT value FROM ratelimit_counters WHERE key = ? AND value >= ?",
            ("cust:acme#1h", n + 0.9),
        ),
        "acme's rate-limit counter to be persisted",
        timeout=30,
    )
    return numbers


@pytest.fixture
def pf(postfix_factory):
    return postfix_factory(hosted_domains=HOSTED)


def test_locked_database(pf, maild_factory, record_property):
    m = maild_factory(front_policy(pf.reinject_port))
    db = m.root / "state.db"
    holder: list[sqlite3.Connection] = []

    def lock() -> None:
        con = sqlite3.connect(db, isolation_level=None, timeout=10)
        con.execute("BEGIN EXCLUSIVE")
        holder.append(con)

    def unlock() -> None:
        holder[0].execute("COMMIT")
        holder[0].close()

    try:
        numbers = exercise(pf, m, db, lock, unlock)
    finally:
        with contextlib.suppress(sqlite3.Error, IndexError):
            holder[0].close()
    record_property("numbers", numbers)


def test_read_only_database(pf, maild_factory, record_property):
    m = maild_factory(front_policy(pf.reinject_port))
    db = m.root / "state.db"
    files = [db, db.with_name("state.db-wal"), db.with_name("state.db-shm"), m.root]
    try:
        numbers = exercise(pf, m, db, lambda: chattr("+i", *files), lambda: chattr("-i", *files))
    finally:
        chattr("-i", *files)
    record_property("numbers", numbers)


def test_full_filesystem(pf, maild_factory, tmp_path, record_property):
    with tmpfs(tmp_path / "statefs", "2m") as fs:
        state = fs / "var"
        state.mkdir(mode=0o750)
        m = maild_factory(front_policy(pf.reinject_port, state=str(state / "maild.db")))
        db = state / "maild.db"
        filler = fs / "filler"
        numbers = exercise(pf, m, db, lambda: fill(filler), filler.unlink, n=12)
        m.stop()
    record_property("numbers", numbers)


def test_start_with_unusable_state_is_one_clear_error(pf, maild_factory):
    """A store maild cannot open (here: immutable) stops `maild serve` with one line naming
    the state file and a non-zero exit, so systemd's Restart= retries it (a traceback,
    before BUG-3 was fixed); once the store is usable again, it starts."""
    m = maild_factory(front_policy(pf.reinject_port))
    m.stop()
    files = [m.root / "state.db", m.root]
    chattr("+i", *files)
    try:
        with pytest.raises(RuntimeError) as exc:
            maild_factory(m.policy, root=m.root, port=m.port)
    finally:
        chattr("-i", *files)
    out = str(exc.value)
    assert "state" in out and str(m.root / "state.db") in out, out
    assert "Traceback" not in out, out[:3000]
    # and once the store is usable again, it starts
    maild_factory(m.policy, root=m.root, port=m.port)


def until_tempfailed(m, port: int, tag: str) -> tuple[list[tuple[str, str, Attempt]], Attempt]:
    """Send stranger mail until maild answers 451 4.3.0 (a message accepted before maild
    saw the fault is fine: it must still be delivered once); maild must stay up."""
    sent: list[tuple[str, str, Attempt]] = []

    def one() -> Attempt | None:
        subj = unique_subject(tag)
        sender = f"{subj}@outside.example"
        a = attempt(port, sender=sender, rcpts=[RCPT], data=message(subj), source=STRANGER)
        assert m.proc.poll() is None, f"maild died (exit {m.proc.returncode}): {a}"
        assert a.accepted or (a.final == 451 and a.text.startswith("4.3.0")), a
        sent.append((subj, sender, a))
        return None if a.accepted else a

    return sent, wait_for(one, "a 451 4.3.0 while the store is broken", timeout=30, interval=0.2)


def rounds_after(m, n: int) -> None:
    """Wait until the daemon ran n more housekeeping rounds (each rewrites its status file)."""
    status = m.root / "maild.status.json"

    def written() -> float:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(status.read_text())["written"]
        return 0.0

    seen = {written()}
    wait_for(lambda: seen.add(written()) or len(seen) > n, f"{n} housekeeping rounds", timeout=30)


def retry_and_count(pf, m, sent: list[tuple[str, str, Attempt]]) -> None:
    """The clients' retries are accepted; every message is delivered exactly once."""
    for subj, sender, a in sent:
        if not a.accepted:
            b = attempt(m.port, sender=sender, rcpts=[RCPT], data=message(subj), source=STRANGER)
            assert b.accepted, b
    settle(pf)
    for subj, _sender, _a in sent:
        assert copies(pf, RCPT, subj) == 1, subj


def test_shared_memory_file_not_writable(pf, maild_factory):
    """Only the -shm file immutable (issue 13 #6): SQLite writes its WAL index through a
    mapping of it, which the kernel answers with SIGBUS; maild died within 2 s and every
    client got "connection refused". Now it stays up, logs the cause once, answers
    451 4.3.0, and relays again once the file is writable."""
    m = maild_factory(front_policy(pf.reinject_port))
    shm = m.root / "state.db-shm"
    assert shm.exists()
    chattr("+i", shm)
    try:
        sent, _ = until_tempfailed(m, m.port, "shm")
        for _ in range(3):  # and it keeps answering 451, without a new log line each time
            sent += until_tempfailed(m, m.port, "shm")[0]
        log = m.log()
        assert log.count("state store: unavailable") == 1, log[-3000:]
        assert log.count(f"cannot write {shm}") == 1, log[-3000:]
        assert "available again" not in log, log[-3000:]
    finally:
        chattr("-i", shm)
    wait_recovered(m)
    retry_and_count(pf, m, sent)

    # Stopped while the file is immutable: closing SQLite would checkpoint through the
    # mapping (SIGBUS); maild leaves it open, exits 0, and the next start recovers the WAL.
    db = m.root / "state.db"
    relayed = "SELECT COUNT(*) FROM decisions WHERE action = 'relay' AND sender LIKE 'shm-%'"
    wait_for(lambda: decision_rows(db, relayed) == [(len(sent),)], "the relay rows")
    chattr("+i", shm)
    try:
        until_tempfailed(m, m.port, "stop")
        assert m.stop() == 0
    finally:
        chattr("-i", shm)
    m = maild_factory(m.policy, root=m.root, port=m.port)
    assert decision_rows(db, relayed) == [(len(sent),)]
    assert decision_rows(db, "PRAGMA integrity_check") == [("ok",)]
    subj = unique_subject("after")
    a = attempt(
        m.port, sender=f"{subj}@outside.example", rcpts=[RCPT], data=message(subj), source=STRANGER
    )
    assert a.accepted, a
    retry_and_count(pf, m, [(subj, f"{subj}@outside.example", a)])


def test_database_not_writable_tempfails_until_repaired(pf, maild_factory):
    """The database and its WAL immutable (issue 13 #7): reads still work from the cache,
    writes fail. Mail got 250 and the log said "available again" every few seconds.
    Health is judged by writes: 451 4.3.0 and no "available again" until a write works."""
    m = maild_factory(front_policy(pf.reinject_port))
    db = m.root / "state.db"
    files = [db, db.with_name("state.db-wal")]
    chattr("+i", *files)
    try:
        sent, _ = until_tempfailed(m, m.port, "ro")
        m.wait_log("state store: unavailable")
        # past several housekeeping rounds (each polls the store with a read that works)
        rounds_after(m, 4)
        wait_for(lambda: m.log().count("decision log: cannot write") >= 1, "the decision log")
        sent += until_tempfailed(m, m.port, "ro")[0]
        assert "available again" not in m.log(), m.log()[-3000:]
    finally:
        chattr("-i", *files)
    wait_recovered(m)
    retry_and_count(pf, m, sent)


def test_start_with_an_empty_state_file_is_refused_unless_init_state(pf, maild_factory):
    """A 0-byte state file (a lost disk, a bad restore) was silently re-initialised at
    start, dropping sanctions and the consent ledger (issue 13 #8). `maild serve` now
    refuses it with one line naming the file and `--init-state`, and leaves it alone;
    with the flag it moves the file aside and starts, and mail flows."""
    m = maild_factory(front_policy(pf.reinject_port))
    m.stop()
    db = m.root / "state.db"
    db.write_bytes(b"")
    with pytest.raises(RuntimeError) as exc:
        maild_factory(m.policy, root=m.root, port=m.port)
    out = str(exc.value)
    assert f"{db} is empty (0 bytes)" in out and "maild serve --init-state" in out, out
    assert "Traceback" not in out, out[:3000]
    assert db.read_bytes() == b""

    again = maild_factory(m.policy, root=m.root, port=m.port, start=False)
    again.write()
    again.logfile = m.root / "maild-init.log"  # the first run's "daemon started" is in the other
    again.proc = subprocess.Popen(
        [*again.cli_argv("serve"), "--log", str(again.logfile), "--allow-root", "--init-state"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=again.root,
    )
    again.wait_log("daemon started", timeout=20)
    assert f"moved {db} aside" in again.log(), again.log()
    aside = [p for p in m.root.iterdir() if p.name.startswith("state.db.refused-")]
    assert [p.read_bytes() for p in aside] == [b""], aside
    subj = unique_subject("init")
    a = attempt(
        again.port,
        sender=f"{subj}@outside.example",
        rcpts=[RCPT],
        data=message(subj),
        source=STRANGER,
    )
    assert a.accepted, a
    settle(pf)
    assert copies(pf, RCPT, subj) == 1
