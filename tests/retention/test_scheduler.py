"""RetentionService in `maild serve`: jobs on schedules, reload, catch-up, live log following."""

from __future__ import annotations

import time

from maild.components import load
from maild.retention import state
from maild.retention.scheduler import RetentionService, next_runs, period
from tests.harness.waits import wait_until_async as wait_for

from .helpers import DAY, add_msg, keydata_config, make_maildir, write_config


async def test_without_retention_start_does_nothing(tmp_path, store):
    cfg = write_config(tmp_path, '[server]\nhostname = "mx.example"\n')
    svc = RetentionService(load(cfg), store)
    await svc.start()
    assert svc.scheduler is None and svc.tracker is None
    await svc.stop()


async def test_one_job_per_scheduled_rule(tmp_path, mail, store):
    path = keydata_config(tmp_path, mail)
    path.write_text(
        path.read_text()
        .replace('name = "shrink"', 'name = "shrink"\nschedule = "manual"')
        .replace("[retention]\n", '[retention]\ndaily_at = "04:05"\n', 1)
    )
    svc = RetentionService(load(path), store)
    await svc.start()
    try:
        jobs = dict(svc.jobs())
        assert set(jobs) == {"retention:trash", "retention:idle"}
        expected = next_runs(svc.cfg)
        assert jobs["retention:trash"] == expected["trash"]
        lt = time.localtime(jobs["retention:trash"])
        assert (lt.tm_hour, lt.tm_min) == (4, 5)
        assert expected["shrink"] is None
    finally:
        await svc.stop()
    assert svc.scheduler is None


async def test_reload_replaces_the_jobs(tmp_path, mail, store):
    path = keydata_config(tmp_path, mail)
    svc = RetentionService(load(path), store)
    await svc.start()
    try:
        assert len(svc.jobs()) == 3
        path.write_text(path.read_text().replace('name = "idle"', 'name = "idle"\nenabled = false'))
        await svc.reload(load(path))
        assert {j for j, _ in svc.jobs()} == {"retention:trash", "retention:shrink"}
    finally:
        await svc.stop()


def test_period_of_schedules():
    now = time.time()
    assert period("17 3 * * *", now) == DAY
    assert period("17 * * * *", now) == 3600
    assert period("17 3 * * sun", now) == 7 * DAY


async def test_a_missed_run_is_caught_up_only_if_the_rule_ran_before(tmp_path, mail, store):
    path = keydata_config(tmp_path, mail)
    run_id = await state.start_run(store, "trash", time.time() - 3 * DAY, "schedule")
    await state.finish_run(store, run_id, time.time() - 3 * DAY, "done", {})
    svc = RetentionService(load(path), store)
    await svc.start()
    try:
        ids = {j for j, _ in svc.jobs()}
        assert "retention-catch-up:trash" in ids
        assert "retention-catch-up:idle" not in ids  # never ran: waits for its schedule
    finally:
        await svc.stop()


async def test_the_scheduler_fires_the_rule(tmp_path, mail, store):
    from datetime import UTC, datetime

    svc = RetentionService(load(keydata_config(tmp_path, mail)), store)
    await svc.start()
    try:
        svc.scheduler.modify_job("retention:trash", next_run_time=datetime.now(UTC))

        async def ran():
            run = (await state.last_runs(store)).get("trash")
            return run is not None and run["status"] == "done" and run["trigger"] == "schedule"

        assert await wait_for(ran)
    finally:
        await svc.stop()


async def test_a_scheduled_job_runs_the_rule_and_never_raises(tmp_path, mail, store):
    path = keydata_config(tmp_path, mail)
    svc = RetentionService(load(path), store)
    await svc._job("trash", "schedule")
    assert (await state.last_runs(store))["trash"]["status"] == "done"
    await svc._job("no-such-rule", "schedule")  # logged, not raised


async def test_a_login_in_the_log_restores_a_shrunk_quota_at_once(tmp_path, mail, store):
    log = tmp_path / "dovecot.log"
    log.write_text("")
    extra = f'[retention.access]\ndovecot_log = "{log}"\npoll_interval = "20ms"\n'
    path = keydata_config(tmp_path, mail, extra=extra)
    root = make_maildir(mail / "hosted.example" / "root" / "Maildir")
    add_msg(root, size=10, mtime=time.time() - 400 * DAY)
    (root / "maildirsize").write_text("52428800S\n10 1\n")
    await state.first_seen(store, ["root@hosted.example"], time.time() - 91 * DAY)
    svc = RetentionService(load(path), store)
    await svc._job("shrink", "schedule")
    assert (root / "maildirsize").read_text().startswith("1048576S\n")
    await svc.start()
    try:
        with open(log, "a") as f:
            f.write(
                time.strftime("%b %d %H:%M:%S") + " imap-login: Info: Login: "
                "user=<root@hosted.example>, method=PLAIN, rip=127.0.0.1, lip=127.0.0.1\n"
            )

        async def restored():
            row = await state.mailbox(store, "root@hosted.example")
            return row.quota_state == "normal"

        assert await wait_for(restored)
        assert (root / "maildirsize").read_text().startswith("52428800S\n")
        row = await state.mailbox(store, "root@hosted.example")
        assert row.access_source == "imap" and row.last_access > time.time() - 60
    finally:
        await svc.stop()
