"""Retention against a real Dovecot: logins seen, deletions visible to IMAP clients,
a shrunk quota refusing deliveries and a login restoring it (both quota wirings)."""

from __future__ import annotations

import dataclasses
import imaplib
import os
import poplib
import time

import pytest

from maild.components import load, open_store
from maild.retention import state
from maild.retention.access import FileFollower, import_dict
from maild.retention.jobs import Runner
from maild.retention.scheduler import RetentionService
from maild.retention.show import mailbox_info
from tests.harness.waits import wait_until_async as wait_for

from .dovecot import Dovecot, find_lda
from .helpers import DAY, require_binary, require_root, retention, skip_or_fail, write_config

pytestmark = pytest.mark.integration

USERS = {
    "alice@hosted.example": "userdb_quota_rule=*:storage=10M",  # forced rule from userdb
    "bob@hosted.example": "",  # limit from maildirsize
    "carol@hosted.example": "",
    "dave@hosted.example": "",
    "erin@hosted.example": "",
}


@pytest.fixture(scope="module")
def dovecot():
    require_root()
    require_binary("dovecot")
    require_binary("doveadm")
    if find_lda() is None:
        skip_or_fail("dovecot-lda not found (Debian package dovecot-core)")
    dc = Dovecot(USERS)
    dc.start()
    dc.make_maildir("bob@hosted.example", maildirsize="52428800S\n0 0\n")
    yield dc
    dc.stop()


@pytest.fixture
async def env(dovecot, tmp_path):
    cfg_path = write_config(
        tmp_path,
        f"""
        [server]
        state = "{tmp_path}/maild.db"

        [retention]
        [retention.store]
        path = "{dovecot.mail}/%d/%n/Maildir"
        root_mailboxes = ["alice@hosted.example", "bob@hosted.example"]

        [retention.access]
        dovecot_log = "{dovecot.log}"
        poll_interval = "50ms"

        [retention.quota]
        dovecot_userdb = "{dovecot.quota_file}"

        [[retention.rules]]
        name = "trash"
        folders = ["\\\\Trash"]
        age = "7d"
        age_by = "saved"

        [[retention.rules]]
        name = "idle"
        idle = "60d"
        age = "90d"
        age_by = "received"

        [[retention.rules]]
        name = "shrink"
        mailboxes = "root"
        idle = "90d"
        action = "shrink"
        quota = "1MB"
        """,
    )
    store = await open_store(str(tmp_path / "maild.db"), str(cfg_path))
    yield cfg_path, retention(cfg_path), store
    await store.close()


def imap(dc: Dovecot, user: str) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", dc.imap_port)
    m.login(user, dc.PASSWORD)
    return m


def pop3_login(dc: Dovecot, user: str) -> None:
    p = poplib.POP3("127.0.0.1", dc.pop3_port)
    p.user(user)
    p.pass_(dc.PASSWORD)
    p.quit()


def age_all(maildir, days: float) -> list:
    """Make every delivered message look received `days` ago (mtime)."""
    out = []
    for sub in ("new", "cur"):
        for name in os.listdir(maildir / sub):
            p = maildir / sub / name
            t = time.time() - days * DAY
            os.utime(p, (t, t))
            out.append(p)
    return out


async def test_imap_and_pop3_logins_are_seen_and_reset_the_idle_clock(dovecot, env):
    _path, cfg, store = env
    assert dovecot.deliver("carol@hosted.example", 1000) == 0
    (old,) = age_all(dovecot.maildir("carol@hosted.example"), 100)
    runner = Runner(cfg, store)
    await state.first_seen(store, ["carol@hosted.example"], time.time() - 100 * DAY)
    plan = await runner.run("idle", dry_run=True, user="carol@hosted.example")
    assert [p["file"].split("/")[-1] for p in plan.planned] == [old.name]

    since = time.time() - 1
    m = imap(dovecot, "carol@hosted.example")
    m.logout()
    pop3_login(dovecot, "dave@hosted.example")
    follower = FileFollower(str(dovecot.log), store)

    async def seen():
        await follower.poll(runner.on_access)
        rows = await state.mailboxes(store, ["carol@hosted.example", "dave@hosted.example"])
        return len(rows) == 2 and all((r.last_access or 0) >= since - 1 for r in rows.values())

    assert await wait_for(seen)
    rows = await state.mailboxes(store)
    assert rows["carol@hosted.example"].access_source == "imap"
    assert rows["dave@hosted.example"].access_source == "pop3"
    plan = await runner.run("idle", dry_run=True, user="carol@hosted.example")
    assert plan.planned == [] and old.exists()  # accessed: no longer idle


async def test_deleted_messages_disappear_from_the_imap_view(dovecot, env):
    _path, cfg, store = env
    user = "carol@hosted.example"
    m = imap(dovecot, user)
    try:
        m.create("Trash")
        for i in range(3):
            assert (
                m.append("Trash", None, None, f"Subject: t{i}\r\n\r\ntrashed\r\n".encode())[0]
                == "OK"
            )
        assert m.append("INBOX", None, None, b"Subject: keep\r\n\r\nkeep\r\n")[0] == "OK"
        typ, data = m.select("Trash")
        assert (typ, int(data[0])) == ("OK", 3)
        rep = await Runner(cfg, store, clock=lambda: time.time() + 7 * DAY + 60).run(
            "trash", user=user
        )
        assert (rep.deleted, rep.errors) == (3, 0)
        m.noop()  # the open session syncs: EXPUNGE x3
        typ, data = m.select("Trash")
        assert int(data[0]) == 0
        typ, data = m.select("INBOX")
        assert int(data[0]) >= 1
    finally:
        m.logout()


@pytest.mark.parametrize(
    "user, original_kb, login",
    [
        (
            "alice@hosted.example",
            "10240",
            "imap",
        ),  # quota_rule from userdb, forced: maild's userdb file
        ("bob@hosted.example", "51200", "pop3"),  # limit from maildirsize line 1
    ],
)
async def test_a_shrunk_quota_refuses_deliveries_and_a_login_restores_it(
    dovecot, env, user, original_kb, login
):
    path, cfg, store = env
    assert dovecot.deliver(user, 1_500_000, "big") == 0
    assert dovecot.deliver(user, 200_000, "small") == 0
    msgs = sorted(age_all(dovecot.maildir(user), 200), key=lambda p: p.stat().st_size)
    small, big = msgs
    os.utime(big, (time.time() - 300 * DAY,) * 2)  # the oldest
    assert dovecot.quota_limit_kb(user) == original_kb
    await state.first_seen(store, [user], time.time() - 100 * DAY)

    rep = await Runner(cfg, store).run("shrink", user=user)
    assert (rep.shrunk, rep.deleted) == (1, 1)
    assert not big.exists() and small.exists()

    async def rule_is(value):
        return dovecot.userdb_field(user, "quota_rule") == value

    if user.startswith("alice"):
        assert await wait_for(lambda: rule_is("*:bytes=1048576"))
    assert dovecot.quota_limit_kb(user) == "1024"
    info = await mailbox_info(
        dataclasses.replace(
            cfg, quota=dataclasses.replace(cfg.quota, doveadm=("doveadm", "-c", str(dovecot.conf)))
        ),
        store,
        user,
        dovecot=True,
    )
    assert info["dovecot"]["storage_limit_kb"] == "1024"
    assert info["quota_state"] == "shrunk" and info["maildirsize"]["bytes_limit"] == 1048576
    assert dovecot.deliver(user, 1_500_000, "refused") == 77  # over the 1 MB quota
    assert dovecot.deliver(user, 10_000, "fits") == 0

    svc = RetentionService(load(path), store)
    await svc.start()
    try:
        if login == "imap":
            imap(dovecot, user).logout()
        else:
            pop3_login(dovecot, user)

        async def restored():
            row = await state.mailbox(store, user)
            return row.quota_state == "normal"

        assert await wait_for(restored)
        assert (await state.mailbox(store, user)).access_source == login

        async def limit_is_back():
            # the login's own Dovecot process may write the 1 MB limit it read back into
            # maildirsize; maild's check a moment after the restore puts it right
            return dovecot.quota_limit_kb(user) == original_kb

        assert await wait_for(limit_is_back), dovecot.quota_limit_kb(user)
    finally:
        await svc.stop()
    if user.startswith("alice"):
        assert await wait_for(lambda: rule_is("*:storage=10M"))
    assert dovecot.quota_limit_kb(user) == original_kb
    assert dovecot.deliver(user, 1_500_000, "welcome back") == 0


async def test_last_login_dict_is_imported(dovecot, env):
    _path, _cfg, store = env
    assert dovecot.deliver("erin@hosted.example", 100) == 0  # a delivery is no access
    m = imap(dovecot, "dave@hosted.example")
    m.logout()
    runner = Runner(_cfg, store)

    async def imported():
        await import_dict(str(dovecot.last_login), "shared/last-login/", runner.on_access)
        row = await state.mailbox(store, "dave@hosted.example")
        return row is not None and row.last_access >= time.time() - 60

    assert await wait_for(imported)
    rows = await state.mailboxes(store)
    assert rows["dave@hosted.example"].access_source == "last_login"
    assert "erin@hosted.example" not in rows
