"""The state database fails under a running maild: locked, read-only, on a full filesystem.

No rule on the SMTP path waits on the store (decision rows are batched every 0.5 s,
rate-limit counters persisted every ~6 s, strikes written from tasks), so mail keeps
flowing while the store is broken. What the tests hold maild to, for each fault:

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
import sqlite3
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
        out.append((subj, sender, RCPT, attempt(port, sender=sender, rcpts=[RCPT],
                                                data=message(subj), source=STRANGER)))
        subj = unique_subject(f"{tag}-out{i}")
        sender = f"{subj}@acme.example"
        out.append((subj, sender, OUTSIDE, attempt(port, sender=sender, rcpts=[OUTSIDE],
                                                   data=message(subj), source=CUSTOMER_IP)))
    return out


def outside_copies(pf, needle: str) -> int:
    return sum(needle.encode() in m for m in pf.outside_messages())


def exercise(pf, m, db: Path, break_store: Callable[[], None], heal: Callable[[], None],
             n: int = 4) -> dict[str, int]:
    """Break the store, send mail, heal it, and check the whole contract; returns numbers."""
    warm = send_batch(m.port, "warm", 1)
    assert all(a.accepted for *_, a in warm), [str(a) for *_, a in warm]
    wait_for(lambda: len(decision_rows(db, "SELECT 1 FROM decisions WHERE action='relay'")) >= 2,
             "warm-up decision rows")
    break_store()
    sent = send_batch(m.port, "broken", n)
    for _subj, _sender, _rcpt, a in sent:
        assert a.accepted or a.temporary, f"refused for good while the store was broken: {a}"
    m.wait_log("decision log: cannot write", timeout=20)
    assert m.proc.poll() is None, "maild died with its store"
    heal()
    for subj, sender, rcpt, a in sent:
        if not a.accepted:  # the client's retry, now that the store works
            b = attempt(m.port, sender=sender, rcpts=[rcpt], data=message(subj),
                        source=STRANGER if rcpt == RCPT else CUSTOMER_IP)
            assert b.accepted, b
    settle(pf)
    for subj, _sender, rcpt, _a in warm + sent:
        n_copies = copies(pf, RCPT, subj) if rcpt == RCPT else outside_copies(pf, subj)
        assert n_copies == 1, (subj, n_copies)

    senders = [sender for _s, sender, _r, _a in warm + sent]

    def relay_rows() -> dict[str, int]:
        rows = decision_rows(db, "SELECT sender, COUNT(*) FROM decisions WHERE action = 'relay' "
                             "GROUP BY sender")
        return {s: c for s, c in rows if s in senders}

    wait_for(lambda: len(relay_rows()) == len(senders), "every decision row to be written",
             timeout=30)
    counts = relay_rows()
    assert all(c == 1 for c in counts.values()), {s: c for s, c in counts.items() if c != 1}
    wait_for(lambda: decision_rows(db, "SELECT value FROM ratelimit_counters WHERE key = ? "
                                       "AND value >= ?", ("cust:acme#1h", n + 0.9)),
             "acme's rate-limit counter to be persisted", timeout=30)
    return {"messages": len(sent), "accepted_while_broken": sum(a.accepted for *_, a in sent)}


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
