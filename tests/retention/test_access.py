"""Access tracking: log lines of every form, following a file across restarts, the dict."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime

import pytest

from maild.retention import state
from maild.retention.access import (
    FileFollower,
    JournalFollower,
    import_dict,
    latest,
    parse_dict_file,
    parse_line,
    parse_timestamp,
    parse_tsv,
)

from .helpers import require_binary

NOW = time.mktime((2025, 6, 15, 12, 0, 0, 0, 0, -1))
ISO = datetime.fromtimestamp(NOW - 2, UTC).isoformat(timespec="microseconds")  # "...+00:00"


@pytest.mark.parametrize(
    "line, user, source",
    [
        # Dovecot 2.3 with log_path
        (
            "Jun 15 11:59:58 imap-login: Info: Login: user=<alice@hosted.example>, method=PLAIN, "
            "rip=127.0.0.1, lip=127.0.0.1, mpid=7654, secured, session=<Kr+u0NxgPtt/AAAB>",
            "alice@hosted.example",
            "imap",
        ),
        (
            "Jun 15 11:59:58 pop3-login: Info: Login: user=<bob@hosted.example>, method=PLAIN, "
            "rip=127.0.0.1, lip=127.0.0.1, mpid=7737, secured, session=<sODw0Nxg1M5/AAAB>",
            "bob@hosted.example",
            "pop3",
        ),
        # through syslog
        (
            "Jun 15 11:59:58 mx1 dovecot: imap-login: Login: user=<Carol@Hosted.Example>, method=PLAIN, "
            "rip=192.0.2.1, lip=192.0.2.2, mpid=1, TLS, session=<x>",
            "carol@hosted.example",
            "imap",
        ),
        (
            f"{ISO} mx1 dovecot[812]: pop3-login: Login: user=<dave>, method=PLAIN, rip=192.0.2.1",
            "dave",
            "pop3",
        ),
        # Dovecot 2.4
        (
            "Jun 15 11:59:58 mx1 dovecot: imap-login: Logged in: user=<erin@hosted.example>, "
            "method=PLAIN, rip=192.0.2.1",
            "erin@hosted.example",
            "imap",
        ),
        (
            "Jun 15 11:59:58 imap-login: Info: Logged in: user=<erin@hosted.example>, method=PLAIN",
            "erin@hosted.example",
            "imap",
        ),
        # Courier
        (
            "Jun 15 11:59:58 mx1 imapd: LOGIN, user=frank@hosted.example, ip=[::ffff:192.0.2.1], "
            "port=[50000], protocol=IMAP",
            "frank@hosted.example",
            "imap",
        ),
        (
            "Jun 15 11:59:58 mx1 pop3d-ssl[123]: LOGIN, user=gina, ip=[::ffff:192.0.2.1], port=[1], "
            "protocol=POP3",
            "gina",
            "pop3",
        ),
    ],
)
def test_login_lines(line, user, source):
    login = parse_line(line, NOW)
    assert login is not None
    assert (login.user, login.source) == (user, source)
    assert login.ts == NOW - 2


@pytest.mark.parametrize(
    "line",
    [
        "Jun 15 11:59:58 submission-login: Info: Login: user=<alice@hosted.example>, method=PLAIN",
        "Jun 15 11:59:58 managesieve-login: Info: Login: user=<alice@hosted.example>",
        "Jun 15 11:59:58 imap-login: Info: Disconnected (auth failed, 1 attempts in 2 secs): "
        "user=<alice@hosted.example>, method=PLAIN",
        "Jun 15 11:59:58 imap(alice@hosted.example)<1><x>: Info: Disconnected: Logged out in=29",
        "Jun 15 11:59:58 lmtp(alice@hosted.example)<1><x>: Info: saved mail to INBOX",
        "Jun 15 11:59:58 lda(alice@hosted.example)<1><x>: Info: msgid=<a@b>: saved mail to INBOX",
        "Jun 15 11:59:58 imap-login: Info: Login: user=<../../etc>, method=PLAIN",
        "Jun 15 11:59:58 mx1 imapd: LOGIN FAILED, user=alice, ip=[::1]",
    ],
)
def test_not_a_pop_or_imap_login(line):
    assert parse_line(line, NOW) is None


def test_timestamps():
    assert parse_timestamp("2025-06-15T10:00:00Z x", NOW) == 1749981600.0
    iso = parse_timestamp("2025-06-15T10:00:00+00:00 x", NOW)
    assert iso == 1749981600.0
    jan = time.mktime((2025, 1, 2, 0, 0, 0, 0, 0, -1))
    dec = parse_timestamp("Dec 31 23:00:00 x", jan)
    assert time.localtime(dec).tm_year == 2024  # last year's line read in January
    assert parse_timestamp("no time here", NOW) is None


def test_a_line_from_the_future_counts_as_now():
    login = parse_line(
        "Dec 31 23:59:59 imap-login: Login: user=<a@b.c>, method=PLAIN",
        time.mktime((2025, 12, 31, 12, 0, 0, 0, 0, -1)),
    )
    assert login is not None and login.ts == time.mktime((2025, 12, 31, 12, 0, 0, 0, 0, -1))


def test_latest_keeps_one_login_per_user():
    a = parse_line("Jun 15 11:00:00 imap-login: Login: user=<a@b.c>,", NOW)
    b = parse_line("Jun 15 11:30:00 pop3-login: Login: user=<a@b.c>,", NOW)
    assert latest([b, a]) == [("a@b.c", b.ts, "pop3")]


def _line(user, proto="imap", ts="Jun 15 11:00:00"):
    return f"{ts} {proto}-login: Info: Login: user=<{user}>, method=PLAIN, rip=127.0.0.1\n"


class Sink:
    def __init__(self):
        self.rows = []

    async def __call__(self, rows):
        self.rows += rows


async def test_follower_resumes_after_restart(tmp_path, store):
    log = tmp_path / "dovecot.log"
    log.write_text(_line("a@x.y") + _line("b@x.y", "pop3"))
    sink = Sink()
    assert await FileFollower(str(log), store, lambda: NOW).poll(sink) == 2
    assert {u for u, _t, _s in sink.rows} == {"a@x.y", "b@x.y"}
    sink2 = Sink()
    follower = FileFollower(str(log), store, lambda: NOW)  # "after a restart"
    assert await follower.poll(sink2) == 0
    with open(log, "a") as f:
        f.write(_line("c@x.y") + "Jun 15 11:00:01 imap-login: Info: Login: user=<d@x.y>")
    assert await follower.poll(sink2) == 1  # d's line is unfinished
    with open(log, "a") as f:
        f.write(", method=PLAIN\n")
    assert await follower.poll(sink2) == 1
    assert [u for u, _t, _s in sink2.rows] == ["c@x.y", "d@x.y"]


async def test_follower_finishes_a_rotated_file_then_reads_the_new_one(tmp_path, store):
    log = tmp_path / "mail.log"
    log.write_text(_line("a@x.y"))
    follower = FileFollower(str(log), store, lambda: NOW)
    await follower.poll(Sink())
    with open(log, "a") as f:
        f.write(_line("late@x.y"))  # written just before rotation
    os.rename(log, tmp_path / "mail.log.1")
    log.write_text(_line("new@x.y"))
    sink = Sink()
    assert await follower.poll(sink) == 2
    assert {u for u, _t, _s in sink.rows} == {"late@x.y", "new@x.y"}
    assert await follower.poll(Sink()) == 0


async def test_follower_rereads_a_truncated_file(tmp_path, store):
    log = tmp_path / "mail.log"
    log.write_text(_line("a@x.y") * 3)
    follower = FileFollower(str(log), store, lambda: NOW)
    await follower.poll(Sink())
    with open(log, "w") as f:  # copytruncate
        f.write(_line("b@x.y"))
    sink = Sink()
    assert await follower.poll(sink) == 1 and sink.rows[0][0] == "b@x.y"


async def test_follower_without_a_file_waits(tmp_path, store):
    assert await FileFollower(str(tmp_path / "nope"), store).poll(Sink()) == 0


def test_last_login_dict_file_format_and_precisions():
    text = (
        "shared/last-login/alice@hosted.example\n1749981600\n"
        "shared/last-login/bob@hosted.example\n1749981600123\n"
        "shared/last-login/carol@hosted.example\n1749981600123456\n"
        "shared/last-login/dave@hosted.example\n1749981600123456000\n"
        "shared/other/x\n1\n"
        "shared/last-login/tab\x01tuser\n1749981600\n"
        "shared/last-login/eve@hosted.example\nnot-a-number\n"
    )
    rows = {u: t for u, t, _s in parse_dict_file(text, "shared/last-login/", NOW)}
    assert rows["alice@hosted.example"] == 1749981600
    assert rows["bob@hosted.example"] == pytest.approx(1749981600.123)
    assert rows["carol@hosted.example"] == pytest.approx(1749981600.123456)
    assert rows["dave@hosted.example"] == pytest.approx(1749981600.123456)
    assert "tab\tuser" in rows
    assert "eve@hosted.example" not in rows and len(rows) == 5


def test_tsv_import_format():
    rows = parse_tsv("# user time\nalice@x.y 1749981600\nbad\nbob@x.y\tnope\n", NOW)
    assert rows == [("alice@x.y", 1749981600, "import")]


async def test_import_dict_calls_back_with_every_user(tmp_path):
    p = tmp_path / "dict"
    p.write_text("shared/last-login/a@x.y\n1749981600\n")
    sink = Sink()
    assert await import_dict(str(p), "shared/last-login/", sink, lambda: NOW) == 1
    assert sink.rows == [("a@x.y", 1749981600, "last_login")]
    assert await import_dict(str(tmp_path / "missing"), "shared/last-login/", sink) == 0


async def test_recorded_access_only_moves_forward(store):
    await state.record_access(store, [("a@x.y", 2000.0, "imap")])
    await state.record_access(store, [("a@x.y", 1000.0, "pop3")])
    row = await state.mailbox(store, "a@x.y")
    assert (row.first_seen, row.last_access, row.access_source) == (2000.0, 2000.0, "imap")
    await state.record_access(store, [("a@x.y", 3000.0, "pop3")])
    row = await state.mailbox(store, "a@x.y")
    assert (row.last_access, row.access_source) == (3000.0, "pop3")


async def test_first_seen_is_never_moved(store):
    await state.first_seen(store, ["a@x.y"], 100.0)
    await state.first_seen(store, ["a@x.y"], 200.0)
    row = await state.mailbox(store, "a@x.y")
    assert row.first_seen == 100.0 and row.last_access is None and row.idle_since == 100.0


def test_journal_entries():
    jf = JournalFollower(["SYSLOG_IDENTIFIER=dovecot"], store=None, clock=lambda: NOW)
    entry = {
        "MESSAGE": "imap-login: Login: user=<a@x.y>, method=PLAIN",
        "__CURSOR": "s=1",
        "__REALTIME_TIMESTAMP": str(int((NOW - 60) * 1e6)),
    }
    login, cursor = jf.parse_entry(json.dumps(entry))
    assert (login.user, login.ts, cursor) == ("a@x.y", NOW - 60, "s=1")
    raw = list(b"pop3-login: Logged in: user=<b@x.y>, m")
    login, _ = jf.parse_entry(json.dumps({"MESSAGE": raw, "__CURSOR": "s=2"}))
    assert login.user == "b@x.y" and login.ts == NOW
    assert jf.parse_entry("not json") == (None, "")
    assert "--after-cursor=s=2" in jf.argv("s=2", True) and "--follow" in jf.argv("s=2", True)
    assert "--lines=all" in jf.argv("", False)


async def test_journal_with_a_cursor_it_no_longer_knows_reads_since_then(store):
    require_binary("journalctl")
    await state.save_log_position(store, "journal", cursor="s=gone;i=1", now=NOW - 100)
    jf = JournalFollower(["SYSLOG_IDENTIFIER=maild-test-nothing"], store, clock=lambda: NOW)
    assert await jf.run(Sink(), follow=False) == 0  # journalctl refuses the cursor
    assert jf.since == NOW - 400
    assert f"--since=@{int(NOW - 400)}" in jf.argv("", False)
    assert await jf.run(Sink(), follow=False) == 0  # and now reads without it
