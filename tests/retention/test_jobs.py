"""Rules run over a generated mail store with an injected clock: exactly the expected
files go, nothing else; runs are idempotent; quota shrinks and comes back."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maild.components import open_store
from maild.retention import quota, restore, state, sweep
from maild.retention.jobs import RunBusy, RunError, Runner
from maild.retention.locks import mailbox_lock, rule_lock

from .helpers import DAY, add_msg, files_in, fs_tick, keydata_config, make_maildir, retention

LAYOUTS = ["maildir++", "fs"]
REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def box(mail: Path, name: str, folders=("Trash",), layout="maildir++") -> Path:
    return make_maildir(mail / "hosted.example" / name / "Maildir", tuple(folders), layout)


def newest_ctime(paths) -> float:
    return max(os.stat(p).st_ctime for p in paths)


async def deletion_rows(store):
    return await store.fetchall(
        "SELECT rule, user, folder, name, size, status FROM retention_deletions ORDER BY id"
    )


# --------------------------------------------------------------------------- Trash


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_trash_goes_after_seven_days_in_trash(tmp_path, mail, store, layout):
    cfg = retention(keydata_config(tmp_path, mail, layout))
    mb = box(mail, "alice", ("Trash", "Deleted Items", "Trash/Old", "Sent"), layout)
    now = 1e9
    trashed = [
        add_msg(mb, "Trash", mtime=now - 400 * DAY, layout=layout),  # old mail, trashed now
        add_msg(mb, "Trash", mtime=now - 1 * DAY, sub="new", layout=layout),
        add_msg(mb, "Deleted Items", mtime=now - 3 * DAY, layout=layout),
    ]
    keep = [
        add_msg(mb, "INBOX", mtime=now - 400 * DAY, layout=layout),
        add_msg(mb, "Trash/Old", mtime=now - 400 * DAY, layout=layout),
        add_msg(mb, "Sent", mtime=now - 400 * DAY, layout=layout),
        add_msg(mb, "Trash", sub="tmp", layout=layout),
    ]
    dot = mb / (".Trash" if layout == "maildir++" else "Trash") / "cur" / ".hidden-old"
    dot.write_bytes(b"x")
    t0 = newest_ctime(trashed + keep)
    clock = Clock(t0 + 1 * DAY)
    runner = Runner(cfg, store, clock=clock)
    rep = await runner.run("trash")
    assert rep.deleted == 0 and all(p.exists() for p in trashed)
    clock.t = t0 + 7 * DAY + 1
    rep = await runner.run("trash")
    assert rep.deleted == 3 and rep.errors == 0
    assert not any(p.exists() for p in trashed)
    assert all(p.exists() for p in keep) and dot.exists()
    rows = await deletion_rows(store)
    assert sorted((r[2], r[5]) for r in rows) == [
        ("Deleted Items", "deleted"),
        ("Trash", "deleted"),
        ("Trash", "deleted"),
    ]


async def test_trash_cutoff_splits_by_time_in_trash(tmp_path, mail, store):
    cfg = retention(keydata_config(tmp_path, mail))
    mb = box(mail, "alice")
    first = [add_msg(mb, "Trash", mtime=1e9) for _ in range(3)]
    fs_tick(mb, int(newest_ctime(first) * 1e9) + 1)
    # received long before the first batch, trashed after it
    second = [add_msg(mb, "Trash", mtime=1e8) for _ in range(3)]
    split = (newest_ctime(first) + min(os.stat(p).st_ctime for p in second)) / 2
    rep = await Runner(cfg, store, clock=Clock(split + 7 * DAY)).run("trash")
    assert rep.deleted == 3
    assert not any(p.exists() for p in first) and all(p.exists() for p in second)


# --------------------------------------------------------------------------- idle 60 / 90


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_idle_mailboxes_lose_mail_received_over_90_days_ago(tmp_path, mail, store, layout):
    cfg = retention(keydata_config(tmp_path, mail, layout))
    now = 2e9
    bob = box(mail, "bob", ("Trash", "Sent", "Archive/2019"), layout)
    old = [
        add_msg(bob, "INBOX", mtime=now - 91 * DAY, layout=layout),
        add_msg(bob, "Archive/2019", mtime=now - 700 * DAY, layout=layout),
        add_msg(bob, "Trash", mtime=now - 100 * DAY, sub="new", layout=layout),
    ]
    young = [
        add_msg(bob, "INBOX", mtime=now - 89 * DAY, layout=layout),
        add_msg(bob, "Sent", mtime=now - 10 * DAY, layout=layout),
    ]
    alice = box(mail, "alice", layout=layout)
    active = [add_msg(alice, "INBOX", mtime=now - 400 * DAY, layout=layout)]
    await state.first_seen(store, ["bob@hosted.example", "alice@hosted.example"], now - 200 * DAY)
    await state.record_access(
        store,
        [
            ("bob@hosted.example", now - 61 * DAY, "imap"),
            ("alice@hosted.example", now - 59 * DAY, "pop3"),
        ],
    )
    rep = await Runner(cfg, store, clock=Clock(now)).run("idle")
    assert (rep.mailboxes, rep.deleted) == (1, 3)
    assert not any(p.exists() for p in old)
    assert all(p.exists() for p in young + active)


async def test_a_mailbox_first_seen_starts_its_idle_clock_then(tmp_path, mail, store):
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    carol = box(mail, "carol")
    old = add_msg(carol, "INBOX", mtime=now - 400 * DAY)
    clock = Clock(now)
    runner = Runner(cfg, store, clock=clock)
    rep = await runner.run("idle")
    assert rep.deleted == 0 and old.exists()
    row = await state.mailbox(store, "carol@hosted.example")
    assert (row.first_seen, row.last_access) == (now, None)
    clock.t = now + 60 * DAY
    assert (await runner.run("idle")).deleted == 0
    clock.t = now + 60 * DAY + 1
    assert (await runner.run("idle")).deleted == 1 and not old.exists()


async def test_repeated_runs_are_idempotent(tmp_path, mail, store):
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    mb = box(mail, "bob", ("Trash", "Sent"))
    for i in range(20):
        add_msg(mb, ("INBOX", "Sent", "Trash")[i % 3], mtime=now - (80 + i) * DAY)
    await state.first_seen(store, ["bob@hosted.example"], now - 100 * DAY)
    runner = Runner(cfg, store, clock=Clock(now))
    first = await runner.run("idle")
    after = files_in(mb)
    second = await runner.run("idle")
    assert first.deleted == 9 and second.deleted == 0  # 91..99 days; 90 is not over 90
    assert files_in(mb) == after and len(after) == 11


async def test_dry_run_lists_exactly_what_the_run_deletes_and_changes_nothing(
    tmp_path, mail, store
):
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    mb = box(mail, "bob", ("Trash", "Sent"))
    (mb / "maildirsize").write_text("0S\n0 0\n")
    for i in range(30):
        add_msg(mb, ("INBOX", "Sent", "Trash")[i % 3], mtime=now - (75 + i) * DAY, size=10 + i)
    await state.first_seen(store, ["bob@hosted.example"], now - 100 * DAY)
    before = files_in(mb)
    runner = Runner(cfg, store, clock=Clock(now))
    planned: list[dict] = []
    rep = await runner.run("idle", dry_run=True, on_plan=planned.append)
    assert files_in(mb) == before
    assert (mb / "maildirsize").read_text() == "0S\n0 0\n"
    assert await deletion_rows(store) == []
    assert await store.fetchall("SELECT * FROM retention_runs") == []
    real = await runner.run("idle")
    done = {(r[1], r[2], r[3], r[4]) for r in await deletion_rows(store)}
    assert {(p["user"], p["folder"], p["file"], p["size"]) for p in planned} == done
    assert rep.deleted == real.deleted == len(done) == 14  # 91..104 days old


async def test_deletions_recorded_and_maildirsize_corrected(tmp_path, mail, store):
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    mb = box(mail, "bob", ("Trash",))
    sizes = [100, 200, 300, 400]
    for i, size in enumerate(sizes):
        add_msg(mb, "INBOX" if i % 2 else "Trash", size=size, mtime=now - (91 + i) * DAY)
    add_msg(mb, "INBOX", size=5000, mtime=now - DAY)
    (mb / "maildirsize").write_text("1000000S\n6000 5\n")
    await state.first_seen(store, ["bob@hosted.example"], now - 100 * DAY)
    rep = await Runner(cfg, store, clock=Clock(now)).run("idle")
    assert (rep.deleted, rep.bytes) == (4, 1000)
    assert (mb / "maildirsize").read_text() == "1000000S\n6000 5\n-1000 -4\n"
    rows = await deletion_rows(store)
    assert sorted(r[4] for r in rows) == sizes and {r[5] for r in rows} == {"deleted"}
    assert all(r[0] == "idle" and r[1] == "bob@hosted.example" for r in rows)
    run = (await state.last_runs(store))["idle"]
    assert (run["status"], run["deleted"], run["bytes"], run["mailboxes"]) == ("done", 4, 1000, 1)


async def test_quota_ignored_folders_are_not_subtracted(tmp_path, mail, store):
    """Courier does not count Trash: deleting from it must not lower the usage."""
    cfg = retention(
        keydata_config(tmp_path, mail, extra='[retention.quota]\nignore_folders = ["Trash"]\n')
    )
    now = 2e9
    mb = box(mail, "bob")
    add_msg(mb, "Trash", size=700, mtime=now - 100 * DAY)
    add_msg(mb, "INBOX", size=300, mtime=now - 100 * DAY)
    (mb / "maildirsize").write_text("0S\n300 1\n")
    await state.first_seen(store, ["bob@hosted.example"], now - 100 * DAY)
    await Runner(cfg, store, clock=Clock(now)).run("idle")
    assert (mb / "maildirsize").read_text() == "0S\n300 1\n-300 -1\n"


# --------------------------------------------------------------------------- shrink / restore

USERDB = '[retention.quota]\ndovecot_userdb = "quota.passwd"\n'


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_idle_root_mailbox_shrinks_and_comes_back(tmp_path, mail, store, layout):
    cfg = retention(keydata_config(tmp_path, mail, layout, extra=USERDB))
    now = 2e9
    root = box(mail, "root", ("Trash",), layout)
    msgs = [
        add_msg(
            root,
            "INBOX" if i % 4 else "Trash",
            size=100_000,
            mtime=now - (300 - i) * DAY,
            layout=layout,
        )
        for i in range(30)
    ]
    (root / "maildirsize").write_text("104857600S,1000C\n3000000 30\n")
    other = box(mail, "other", layout=layout)
    other_msgs = [
        add_msg(other, size=100_000, mtime=now - 300 * DAY, layout=layout) for _ in range(30)
    ]
    await state.first_seen(store, ["root@hosted.example", "other@hosted.example"], now - 91 * DAY)
    userdb = quota.UserdbOverrides(str(tmp_path / "quota.passwd"))
    runner = Runner(cfg, store, clock=Clock(now))

    rep = await runner.run("shrink")
    assert (rep.shrunk, rep.deleted) == (1, 20)
    # the 20 oldest went, 10 x 100 kB remain <= 1 MiB
    assert [p.exists() for p in msgs] == [False] * 20 + [True] * 10
    assert all(p.exists() for p in other_msgs)
    lines = (root / "maildirsize").read_text().splitlines()
    assert lines[0] == "1048576S,1000C" and lines[1:] == ["3000000 30", "-2000000 -20"]
    assert quota.read_original(os.open(root, os.O_RDONLY)) == "104857600S,1000C"
    row = await state.mailbox(store, "root@hosted.example")
    assert (row.quota_state, row.original_quota, row.shrunk_quota) == (
        "shrunk",
        "104857600S,1000C",
        "1048576S,1000C",
    )
    assert userdb.limit("root@hosted.example") == 1048576
    assert userdb.limit("other@hosted.example") is None

    again = await runner.run("shrink")  # shrinking twice is harmless
    assert (again.shrunk, again.deleted) == (0, 0)
    assert (await state.mailbox(store, "root@hosted.example")).original_quota == "104857600S,1000C"

    await runner.on_access([("root@hosted.example", now + 60, "imap")])
    assert (root / "maildirsize").read_text().splitlines()[0] == "104857600S,1000C"
    assert userdb.limit("root@hosted.example") is None
    assert not (root / quota.ORIGINAL).exists()
    row = await state.mailbox(store, "root@hosted.example")
    assert (row.quota_state, row.original_quota, row.restored_at) == ("normal", None, now)
    assert (await runner.run("shrink")).shrunk == 0  # accessed: not idle any more


async def test_a_shrink_that_fails_halfway_is_finished_by_the_next_run(
    tmp_path, mail, store, monkeypatch
):
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    root = box(mail, "root")
    old = add_msg(root, size=2_000_000, mtime=now - 100 * DAY)
    (root / "maildirsize").write_text("52428800S\n2000000 1\n")
    await state.first_seen(store, ["root@hosted.example"], now - 91 * DAY)
    runner = Runner(cfg, store, clock=Clock(now))

    def fail(*a, **k):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(sweep.Sweep, "_delete", fail)
    rep = await runner.run("shrink")
    assert rep.errors == 1 and old.exists()
    assert (root / "maildirsize").read_text().startswith("1048576S\n")  # limit already set
    assert (await state.mailbox(store, "root@hosted.example")).quota_state == "shrinking"
    monkeypatch.undo()
    rep = await runner.run("shrink")
    assert (rep.errors, rep.deleted) == (0, 1) and not old.exists()
    row = await state.mailbox(store, "root@hosted.example")
    assert (row.quota_state, row.original_quota) == ("shrunk", "52428800S")
    await runner.on_access([("root@hosted.example", now, "imap")])
    assert (root / "maildirsize").read_text().startswith("52428800S\n")


async def test_shrink_without_a_maildirsize_restores_by_removing_it(tmp_path, mail, store):
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    root = box(mail, "root")
    add_msg(root, size=2_000_000, mtime=now - 100 * DAY)
    keep = add_msg(root, size=1000, mtime=now - 99 * DAY)
    await state.first_seen(store, ["root@hosted.example"], now - 91 * DAY)
    runner = Runner(cfg, store, clock=Clock(now))
    rep = await runner.run("shrink")
    assert rep.deleted == 1 and keep.exists()
    md = quota.parse((root / "maildirsize").read_text())
    assert (md.limit_line, md.usage_bytes, md.usage_count) == ("1048576S", 1000, 1)
    assert (await state.mailbox(store, "root@hosted.example")).original_quota == quota.NO_FILE
    await runner.on_access([("root@hosted.example", now, "pop3")])
    assert not (root / "maildirsize").exists()


async def test_the_original_quota_survives_losing_the_state_store(tmp_path, mail, store):
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    root = box(mail, "root")
    (root / "maildirsize").write_text("52428800S\n0 0\n")
    await state.first_seen(store, ["root@hosted.example"], now - 91 * DAY)
    await Runner(cfg, store, clock=Clock(now)).run("shrink")
    assert (root / "maildirsize").read_text().startswith("1048576S\n")
    await store.execute("DELETE FROM retention_mailboxes")  # the store is lost
    await state.first_seen(store, ["root@hosted.example"], now - 91 * DAY)
    runner = Runner(cfg, store, clock=Clock(now + DAY))
    await runner.run("shrink")
    assert (await state.mailbox(store, "root@hosted.example")).original_quota == "52428800S"
    await runner.on_access([("root@hosted.example", now + DAY, "imap")])
    assert (root / "maildirsize").read_text().startswith("52428800S\n")


async def test_runs_restore_quotas_of_mailboxes_accessed_meanwhile(tmp_path, mail, store):
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    root = box(mail, "root")
    (root / "maildirsize").write_text("52428800S\n0 0\n")
    await state.first_seen(store, ["root@hosted.example"], now - 91 * DAY)
    runner = Runner(cfg, store, clock=Clock(now))
    await runner.run("shrink")
    # an access recorded without the restore (e.g. by another process's import)
    await state.record_access(store, [("root@hosted.example", now + 10, "last_login")])
    rep = await runner.run("trash")
    assert rep.restored == 1
    assert (root / "maildirsize").read_text().startswith("52428800S\n")


async def test_a_restore_undone_by_a_racing_recalculation_is_put_back(
    tmp_path, mail, store, monkeypatch
):
    """Dovecot rewrites maildirsize with the limit it read; if it read the shrunk one just
    before the restore, maild notices and restores again."""
    monkeypatch.setattr(restore, "VERIFY_AFTER", (0.0,))
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    root = box(mail, "root")
    (root / "maildirsize").write_text("52428800S\n0 0\n")
    await state.first_seen(store, ["root@hosted.example"], now - 91 * DAY)
    runner = Runner(cfg, store, clock=Clock(now))
    await runner.run("shrink")
    await runner.on_access([("root@hosted.example", now, "imap")])
    assert (root / "maildirsize").read_text().startswith("52428800S\n")
    (root / "maildirsize").write_text("1048576S\n0 0\n")  # the racing rewrite
    await asyncio.gather(*runner.restorer._later)  # the delayed check
    assert (root / "maildirsize").read_text().startswith("52428800S\n")
    (root / "maildirsize").write_text("1048576S\n0 0\n")
    assert (await runner.run("trash")).errors == 0  # every run checks too
    assert (root / "maildirsize").read_text().startswith("52428800S\n")
    (root / "maildirsize").write_text("2097152S\n0 0\n")  # the operator's change
    await runner.run("trash")
    assert (root / "maildirsize").read_text().startswith("2097152S\n")


async def test_a_login_while_a_run_holds_the_mailbox_restores_when_it_is_free(
    tmp_path, mail, store, monkeypatch
):
    monkeypatch.setattr(restore, "RESTORE_RETRY", 0.01)
    monkeypatch.setattr(restore, "VERIFY_AFTER", (0.0,))
    cfg = dataclasses.replace(retention(keydata_config(tmp_path, mail)), lock_timeout=0.0)
    now = 2e9
    root = box(mail, "root")
    (root / "maildirsize").write_text("52428800S\n0 0\n")
    await state.first_seen(store, ["root@hosted.example"], now - 91 * DAY)
    runner = Runner(cfg, store, clock=Clock(now))
    await runner.run("shrink")
    held = mailbox_lock(runner.lock_dir, "root@hosted.example", 0)
    held.acquire()
    try:
        await runner.on_access([("root@hosted.example", now, "pop3")], background=True)
        await asyncio.sleep(0.05)  # a few attempts, all refused by the lock
        assert (await state.mailbox(store, "root@hosted.example")).quota_state == "shrunk"
    finally:
        held.release()
    while runner.restorer._later:
        await asyncio.gather(*runner.restorer._later)
    assert (await state.mailbox(store, "root@hosted.example")).quota_state == "normal"
    assert (root / "maildirsize").read_text().startswith("52428800S\n")


async def test_every_decision_is_one_greppable_log_line(tmp_path, mail, store, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="maild.retention")
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    root = box(mail, "root", ("Deleted Items",))
    add_msg(root, "Deleted Items", size=1234, mtime=now - 100 * DAY)
    add_msg(root, size=2_000_000, mtime=now - 100 * DAY)
    (root / "maildirsize").write_text("52428800S\n0 0\n")
    await state.first_seen(store, ["root@hosted.example"], now - 95 * DAY)
    runner = Runner(cfg, store, clock=Clock(now))
    await runner.run("trash", dry_run=True)
    await runner.run("idle")
    await runner.run("shrink")
    await runner.on_access([("root@hosted.example", now, "imap")])
    lines = [r.getMessage() for r in caplog.records if r.name == "maild.retention"]
    expected = [
        "retention: rule=trash user=root@hosted.example folder=Deleted Items would_delete=1 "
        "bytes=1234 dry_run=yes",
        "retention: run rule=trash status=done mailboxes=1 scanned=1 cached_dirs=0 would_delete=1 "
        "bytes=1234 vanished=0 skipped=0 would_shrink=0 restored=0 errors=0 dry_run=yes",
        "retention: rule=idle user=root@hosted.example folder=Deleted Items deleted=1 bytes=1234 "
        "vanished=0 dry_run=no",
        "retention: run rule=idle status=done mailboxes=1 scanned=2 ",
        "retention: rule=shrink user=root@hosted.example action=shrink quota=1048576S "
        "original=52428800S usage=0 deleted=0 dry_run=no",
        "retention: action=restore user=root@hosted.example quota=52428800S "
        "reason=access source=imap",
    ]
    for want in expected:
        assert any(line.startswith(want) for line in lines), (want, lines)
    # a grep for what was deleted finds only the real runs' lines
    assert all("dry_run=no" in line for line in lines if "deleted=" in line), lines
    assert all(line.startswith("retention: ") for line in lines)
    assert not any("xxxx" in line for line in lines)  # never message content


# --------------------------------------------------------------------------- trim (CT)

CT = """
[retention]
[retention.store]
path = "@MAIL@/%d/%n/Maildir"

[[retention.rules]]
name = "pop3-trim"
folders = ["INBOX"]
action = "trim"
max_size = "500k"
age = "14d"
"""


async def test_trim_deletes_oldest_first_down_to_the_size_but_not_young_mail(tmp_path, mail, store):
    from .helpers import write_config

    cfg = retention(write_config(tmp_path, CT, mail=mail))
    now = 2e9
    mb = box(mail, "pop")
    ages = [100, 90, 80, 70, 60, 13, 12, 11, 10, 9]
    msgs = [add_msg(mb, size=100 * 1024, mtime=now - a * DAY) for a in ages]
    sent = add_msg(mb, "Trash", size=900 * 1024, mtime=now - 200 * DAY)
    rep = await Runner(cfg, store, clock=Clock(now)).run("pop3-trim")
    assert rep.deleted == 5
    assert [p.exists() for p in msgs] == [False] * 5 + [True] * 5
    assert sent.exists()
    msgs.append(add_msg(mb, size=100 * 1024, mtime=now - 8 * DAY))
    rep = await Runner(cfg, store, clock=Clock(now)).run("pop3-trim")
    assert rep.deleted == 0  # over 500k, but all younger than 14 days


# --------------------------------------------------------------------------- safety


async def test_symlinks_tmp_and_dotfiles_are_never_touched(tmp_path, mail, store):
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    outside = make_maildir(tmp_path / "outside", ("Trash",))
    precious = [
        add_msg(outside, "INBOX", mtime=now - 900 * DAY),
        add_msg(outside, "Trash", mtime=now - 900 * DAY),
    ]
    mb = box(mail, "bob", ())
    os.symlink(outside / ".Trash", mb / ".Trash")  # symlinked folder
    os.symlink(precious[0], mb / "cur" / "1.evil,S=1:2,S")  # symlinked message
    os.symlink(outside / "cur", mb / ".Sent")  # not even a maildir
    tmpmsg = add_msg(mb, sub="tmp", mtime=now - 900 * DAY)
    dot = mb / "new" / ".old"
    dot.write_bytes(b"x")
    os.utime(dot, (now - 900 * DAY,) * 2)
    evil_user = mail / "hosted.example" / "mallory"
    os.symlink(outside.parent, evil_user)  # symlinked user directory
    await state.first_seen(store, ["bob@hosted.example", "mallory@hosted.example"], now - 100 * DAY)
    runner = Runner(cfg, store, clock=Clock(now + 30 * DAY))
    for rule in ("trash", "idle", "shrink"):
        rep = await runner.run(rule)
        assert rep.deleted == 0, rule
    assert all(p.exists() for p in precious) and tmpmsg.exists() and dot.exists()


async def test_a_file_renamed_meanwhile_is_vanished_not_an_error(
    tmp_path, mail, store, monkeypatch
):
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    mb = box(mail, "bob")
    a = add_msg(mb, mtime=now - 100 * DAY)
    b = add_msg(mb, mtime=now - 100 * DAY)
    await state.first_seen(store, ["bob@hosted.example"], now - 100 * DAY)
    real_plan = sweep.plan

    def plan_then_flag_change(*args, **kw):
        victims = real_plan(*args, **kw)
        os.rename(a, a.with_name(a.name + "T"))  # a client sets a flag
        return victims

    monkeypatch.setattr(sweep, "plan", plan_then_flag_change)
    rep = await Runner(cfg, store, clock=Clock(now)).run("idle")
    assert (rep.deleted, rep.vanished, rep.errors) == (1, 1, 0)
    assert not b.exists() and a.with_name(a.name + "T").exists()
    assert sorted(r[5] for r in await deletion_rows(store)) == ["deleted", "vanished"]


async def test_an_access_during_the_run_spares_the_mailbox(tmp_path, mail, store):
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    a, b = box(mail, "a"), box(mail, "b")
    old = [add_msg(a, mtime=now - 100 * DAY), add_msg(b, mtime=now - 100 * DAY)]
    await state.first_seen(store, ["a@hosted.example", "b@hosted.example"], now - 100 * DAY)
    loop = asyncio.get_running_loop()

    def progress(done, total):
        if done == 1:  # b logs in after the run read the accesses, before its turn
            asyncio.run_coroutine_threadsafe(
                state.record_access(store, [("b@hosted.example", now - 1, "imap")]), loop
            ).result()

    rep = await Runner(cfg, store, clock=Clock(now)).run("idle", on_progress=progress)
    assert (rep.deleted, rep.skipped) == (1, 1)
    assert not old[0].exists() and old[1].exists()


async def test_a_busy_mailbox_is_skipped_and_done_next_time(tmp_path, mail, store):
    cfg = dataclasses.replace(retention(keydata_config(tmp_path, mail)), lock_timeout=0.0)
    now = 2e9
    mb = box(mail, "bob")
    old = add_msg(mb, mtime=now - 100 * DAY)
    await state.first_seen(store, ["bob@hosted.example"], now - 100 * DAY)
    runner = Runner(cfg, store, clock=Clock(now))
    held = mailbox_lock(runner.lock_dir, "bob@hosted.example", 0)
    await asyncio.to_thread(held.acquire)
    try:
        rep = await runner.run("idle")
    finally:
        held.release()
    assert (rep.skipped, rep.deleted) == (1, 0) and old.exists()
    assert (await runner.run("idle")).deleted == 1


async def test_one_run_per_rule_at_a_time(tmp_path, mail, store):
    cfg = retention(keydata_config(tmp_path, mail))
    runner = Runner(cfg, store)
    held = rule_lock(runner.lock_dir, "trash")
    held.acquire()
    try:
        with pytest.raises(RunBusy):
            await runner.run("trash")
        assert (await runner.run("trash", dry_run=True)).status == "done"
    finally:
        held.release()


async def test_root_rules_do_not_run_without_the_list_of_root_mailboxes(tmp_path, mail, store):
    from .helpers import write_config

    body = (
        keydata_config(tmp_path, mail)
        .read_text()
        .replace('root_mailboxes = ["root@*"]', f'root_mailboxes_file = "{tmp_path}/missing"')
    )
    cfg = retention(write_config(tmp_path, body))
    with pytest.raises(RunError, match="root mailboxes"):
        await Runner(cfg, store).run("shrink")


async def test_user_option(tmp_path, mail, store):
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    a, b = box(mail, "a"), box(mail, "b")
    olds = [add_msg(a, mtime=now - 100 * DAY), add_msg(b, mtime=now - 100 * DAY)]
    await state.first_seen(store, ["a@hosted.example", "b@hosted.example"], now - 100 * DAY)
    runner = Runner(cfg, store, clock=Clock(now))
    assert (await runner.run("idle", user="b@hosted.example")).deleted == 1
    assert olds[0].exists() and not olds[1].exists()
    with pytest.raises(RunError, match="no mailbox"):
        await runner.run("idle", user="nobody@hosted.example")
    with pytest.raises(RunError, match="not a usable user"):
        await runner.run("idle", user="../etc@hosted.example")


async def test_unchanged_directories_are_not_read_again(tmp_path, mail, store, monkeypatch):
    monkeypatch.setattr(sweep, "RACY_SECONDS", -1.0)  # test dirs are only milliseconds old
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    mb = box(mail, "bob", ("Trash", "Sent"))
    for i in range(40):
        add_msg(mb, ("INBOX", "Sent", "Trash")[i % 3], mtime=now - 30 * DAY)
    await state.first_seen(store, ["bob@hosted.example"], now - 100 * DAY)
    runner = Runner(cfg, store, clock=Clock(now))
    first = await runner.run("idle")
    assert (first.scanned, first.deleted) == (40, 0)
    second = await runner.run("idle")
    assert (second.scanned, second.deleted) == (0, 0) and second.cached_dirs >= 3
    late = add_msg(mb, "Sent", mtime=now - 95 * DAY)  # changes Sent/cur only
    third = await runner.run("idle")
    assert third.deleted == 1 and not late.exists()
    assert 0 < third.scanned < 40
    # time passing makes cached directories due again
    later = await Runner(cfg, store, clock=Clock(now + 61 * DAY)).run("idle")
    assert later.deleted == 40 and files_in(mb) == set()


async def test_a_directory_changed_just_now_is_read_again(tmp_path, mail, store):
    """File-system timestamps are coarse: a directory modified within the last moments
    could change again without its mtime moving, so it is not remembered."""
    cfg = retention(keydata_config(tmp_path, mail))
    now = 2e9
    mb = box(mail, "bob")
    for _ in range(5):
        add_msg(mb, mtime=now - 30 * DAY)
    await state.first_seen(store, ["bob@hosted.example"], now - 100 * DAY)
    runner = Runner(cfg, store, clock=Clock(now))
    assert (await runner.run("idle")).scanned == 5
    second = await runner.run("idle")
    assert (second.scanned, second.cached_dirs) == (5, 0)
    assert await store.fetchall("SELECT path FROM retention_dircache WHERE count > 0") == []


# --------------------------------------------------------------------------- interruption

CRASH = textwrap.dedent("""
    import asyncio, os, sys
    sys.path.insert(0, {tests!r})
    from retention.helpers import retention
    from maild.retention import jobs, quota, sweep
    from maild.components import open_store

    point, n = sys.argv[1], int(sys.argv[2])
    count = 0
    real_unlink, real_append = sweep.unlink_message, quota.append_usage

    def unlink(fd, f):
        global count
        if point == "unlink" and count == n:
            os._exit(9)
        count += 1
        return real_unlink(fd, f)

    def append(fd, b, c):
        real_append(fd, b, c)
        if point == "append":
            os._exit(9)

    sweep.unlink_message = unlink
    quota.append_usage = append

    async def main():
        cfg = retention({cfg!r})
        store = await open_store({db!r}, {cfg!r})
        await jobs.Runner(cfg, store, clock=lambda: {now!r}).run("idle")
    asyncio.run(main())
""")


@pytest.mark.parametrize("point, n", [("unlink", 0), ("unlink", 3), ("append", 0)])
async def test_a_run_killed_at_any_point_is_finished_consistently(tmp_path, mail, point, n):
    cfg_path = keydata_config(tmp_path, mail)
    now = 2e9
    mb = box(mail, "bob")
    old = [add_msg(mb, size=100 + i, mtime=now - 100 * DAY) for i in range(6)]
    young = [add_msg(mb, size=1000, mtime=now - 10 * DAY) for _ in range(2)]
    (mb / "maildirsize").write_text(f"0S\n{sum(100 + i for i in range(6)) + 2000} 8\n")
    db = str(tmp_path / "state.db")
    store = await open_store(db, str(cfg_path))
    await state.first_seen(store, ["bob@hosted.example"], now - 100 * DAY)
    await store.close()
    script = CRASH.format(tests=str(REPO / "tests"), cfg=str(cfg_path), db=db, now=now)
    proc = subprocess.run(
        [sys.executable, "-c", script, point, str(n)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 9, proc.stderr

    store = await open_store(db, str(cfg_path))
    try:
        pending = await store.fetchall(
            "SELECT count(*) FROM retention_deletions WHERE status='pending'"
        )
        assert pending[0][0] == 6
        rep = await Runner(retention(cfg_path), store, clock=Clock(now)).run("idle")
        assert rep.errors == 0
        assert not any(p.exists() for p in old) and all(p.exists() for p in young)
        md = quota.parse((mb / "maildirsize").read_text())
        assert (md.usage_bytes, md.usage_count) == (2000, 2)
        statuses = await store.fetchall(
            "SELECT status, count(*) FROM retention_deletions GROUP BY status ORDER BY status"
        )
        done = dict(statuses)
        assert "pending" not in done
        assert done.get("gone", 0) == (n if point == "unlink" else 6)
        assert done.get("deleted", 0) == (6 - n if point == "unlink" else 0)
        assert done.get("kept", 0) == (6 - n if point == "unlink" else 0)
        run_states = dict(await store.fetchall("SELECT id, status FROM retention_runs"))
        assert sorted(run_states.values()) == ["done", "interrupted"]
    finally:
        await store.close()


# --------------------------------------------------------------------------- property

message = st.tuples(
    st.sampled_from(["INBOX", "Trash", "Sent", "Deleted Items", "A/B"]),
    st.integers(0, 200),
    st.integers(1, 3000),
    st.sampled_from(["cur", "new"]),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    msgs=st.lists(message, max_size=25),
    idle_days=st.integers(0, 120),
    layout=st.sampled_from(LAYOUTS),
    max_size=st.integers(0, 20000),
)
def test_property_exactly_the_expected_files_go(
    tmp_path_factory, msgs, idle_days, layout, max_size
):
    tmp = tmp_path_factory.mktemp("prop")
    mail = tmp / "vmail"
    extra = f"""
[[retention.rules]]
name = "trim"
folders = ["INBOX", "Sent"]
action = "trim"
max_size = {max_size}
"""
    cfg = retention(_with_extra_rule(tmp, mail, layout, extra))
    now = 2e9
    mb = box(mail, "u", ("Trash", "Sent", "Deleted Items", "A/B"), layout)
    made = [
        (add_msg(mb, f, size=size, mtime=now - age * DAY - 1, sub=sub, layout=layout), f, age, size)
        for f, age, size, sub in msgs
    ]
    idle = idle_days > 60
    expect_idle = {p for p, _f, age, _s in made if idle and age >= 90}  # mtime is 1 s older
    remaining = [(p, f, age, s) for p, f, age, s in made if p not in expect_idle]
    trim_pool = sorted(
        [m for m in remaining if m[1] in ("INBOX", "Sent")],
        key=lambda m: (os.stat(m[0]).st_mtime, m[1], m[0].parent.name, m[0].name),
    )
    usage = sum(m[3] for m in trim_pool)
    expect_trim = set()
    for p, _f, _a, s in trim_pool:
        if usage <= max_size:
            break
        expect_trim.add(p)
        usage -= s

    async def go():
        store = await open_store(str(tmp / "state.db"), str(tmp / "policies.toml"))
        try:
            await state.first_seen(store, ["u@hosted.example"], now - idle_days * DAY)
            runner = Runner(cfg, store, clock=Clock(now))
            r1 = await runner.run("idle")
            after_idle = {p for p, *_ in made if p.exists()}
            r2 = await runner.run("trim")
            after_trim = {p for p, *_ in made if p.exists()}
            again = [await runner.run(n) for n in ("idle", "trim")]
            return r1, r2, after_idle, after_trim, again
        finally:
            await store.close()

    r1, r2, after_idle, after_trim, again = asyncio.run(go())
    everything = {p for p, *_ in made}
    assert after_idle == everything - expect_idle
    assert after_trim == everything - expect_idle - expect_trim
    assert (r1.deleted, r2.deleted) == (len(expect_idle), len(expect_trim))
    assert [r.deleted for r in again] == [0, 0]


def _with_extra_rule(tmp, mail, layout, extra):
    p = keydata_config(tmp, mail, layout)
    p.write_text(p.read_text() + extra)
    return p
