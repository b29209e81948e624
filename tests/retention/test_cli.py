"""The retention commands, through click, on a generated mail store."""

from __future__ import annotations

import json
import time

import click
import pytest
from click.testing import CliRunner

from maild.components import WIRING
from maild.retention.cli import access_group, mailbox_group, retention_group

from .helpers import DAY, add_msg, files_in, keydata_config, make_maildir, write_config


@click.group(context_settings={"obj": WIRING})
@click.option("-c", "--config", default="policies.toml")
def cli(config: str) -> None:
    """Stand-in for maild's main group (which adds the same groups, from maild.components)."""


for group in (retention_group, mailbox_group, access_group):
    cli.add_command(group)


@pytest.fixture
def setup(tmp_path, mail):
    log = tmp_path / "dovecot.log"
    log.write_text("")
    cfg = keydata_config(tmp_path, mail, extra=f'[retention.access]\ndovecot_log = "{log}"\n')
    mb = make_maildir(mail / "hosted.example" / "alice" / "Maildir", ("Trash",))
    return cfg, mb, log


def run(cfg, *args):
    return CliRunner().invoke(cli, ["-c", str(cfg), *args], catch_exceptions=False)


def test_dry_run_prints_and_changes_nothing_then_run_deletes(setup):
    cfg, mb, _ = setup
    msg = add_msg(mb, "Trash", size=321, mtime=time.time() - 400 * DAY)
    r = run(cfg, "retention", "run", "idle", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "would-delete" not in r.output  # never seen before: its idle clock starts now
    r = run(cfg, "access", "touch", "alice@hosted.example", "--at", str(time.time() - 100 * DAY))
    assert r.exit_code == 0
    r = run(cfg, "retention", "run", "idle", "--dry-run")
    lines = [x for x in r.output.splitlines() if x.startswith("would-delete")]
    assert len(lines) == 1
    fields = lines[0].split("\t")
    assert fields[1:4] == ["idle", "alice@hosted.example", "Trash"] and fields[5] == "321"
    assert fields[4] == f"cur/{msg.name}" and msg.exists()
    r = run(cfg, "retention", "run", "idle")
    assert r.exit_code == 0 and "deleted 1 (321 bytes)" in r.output
    assert not msg.exists() and files_in(mb) == set()
    r = run(cfg, "retention", "deletions", "--json")
    rec = json.loads(r.output.splitlines()[0])
    assert (rec["user"], rec["folder"], rec["size"], rec["status"]) == (
        "alice@hosted.example",
        "Trash",
        321,
        "deleted",
    )


def test_status_shows_next_and_last_runs(setup):
    cfg, _mb, _ = setup
    assert run(cfg, "retention", "run", "trash").exit_code == 0
    r = run(cfg, "retention", "status", "--json")
    info = json.loads(r.output)
    by = {x["rule"]: x for x in info["rules"]}
    assert set(by) == {"trash", "idle", "shrink"}
    assert by["trash"]["last_run"]["status"] == "done" and by["idle"]["last_run"] is None
    assert by["trash"]["next_run"] > time.time()
    r = run(cfg, "retention", "status")
    assert "trash: delete, schedule daily" in r.output and "never run" in r.output


def test_mailbox_show(setup, caplog):
    cfg, mb, _ = setup
    old = add_msg(mb, "INBOX", size=1000, mtime=time.time() - 400 * DAY)
    add_msg(mb, "Trash", size=200)
    (mb / "maildirsize").write_text("52428800S\n1200 2\n")
    run(cfg, "access", "touch", "alice@hosted.example", "--at", str(time.time() - 100 * DAY))
    r = run(cfg, "mailbox", "show", "alice@hosted.example", "--json", "--files")
    info = json.loads(r.output)
    assert info["last_access"] is not None and info["access_source"] == "touch"
    assert info["maildirsize"]["limit"] == "52428800S"
    assert info["usage_bytes"] == 1200
    assert {f["folder"]: f["messages"] for f in info["folders"]} == {"INBOX": 1, "Trash": 1}
    assert {n["rule"] for n in info["next"]} == {"trash", "idle", "shrink"}
    nxt = {n["rule"]: n for n in info["next"]}
    assert nxt["trash"]["delete"] == 0  # in Trash for less than 7 days
    assert [f["file"] for f in nxt["idle"]["files"]] == [f"cur/{old.name}"]
    assert old.exists()  # showing deletes nothing
    r = run(cfg, "mailbox", "show", "Alice@Hosted.Example")
    assert r.exit_code == 0 and "quota        52428800S" in r.output and "Trash" in r.output
    import logging

    assert not [
        r for r in caplog.records if r.name == "maild.retention" and r.levelno >= logging.INFO
    ]


def test_mailbox_show_says_when_dovecot_cannot_be_asked(setup):
    cfg, _mb, _ = setup
    cfg.write_text(cfg.read_text() + '\n[retention.quota]\ndoveadm = ["/nonexistent/doveadm"]\n')
    r = run(cfg, "mailbox", "show", "alice@hosted.example", "--dovecot")
    assert r.exit_code == 0 and "cannot ask doveadm" in r.output


def test_access_touch_import_poll_and_list(setup, tmp_path):
    cfg, _mb, log = setup
    d = tmp_path / "last-login.dict"
    d.write_text(f"shared/last-login/bob@hosted.example\n{int(time.time()) - 5}\n")
    r = run(cfg, "access", "import", "--dict", str(d))
    assert r.exit_code == 0 and "imported 1" in r.output
    log.write_text(
        time.strftime("%b %d %H:%M:%S")
        + " pop3-login: Info: Login: user=<carol@hosted.example>, method=PLAIN\n"
    )
    r = run(cfg, "access", "poll")
    assert r.exit_code == 0 and "1 logins read" in r.output
    assert "0 logins read" in run(cfg, "access", "poll").output  # position kept
    r = run(cfg, "access", "list", "--json")
    users = {json.loads(x)["user"]: json.loads(x) for x in r.output.splitlines()}
    assert users["bob@hosted.example"]["source"] == "last_login"
    assert users["carol@hosted.example"]["source"] == "pop3"


@pytest.mark.parametrize(
    "args, says",
    [
        (["retention", "run", "nope"], "no retention rule named 'nope'"),
        (["access", "touch", "../x"], "not a usable user name"),
        (["access", "touch", "a@b.c", "--at", "yesterday"], "Unix time"),
        (["access", "list", "--idle-over", "long"], "duration"),
        (["mailbox", "show", "a/b@c"], "not a usable user name"),
    ],
)
def test_bad_input_is_one_clear_line(setup, args, says):
    cfg, _mb, _ = setup
    r = run(cfg, *args)
    assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output


def test_a_broken_config_exits_2_naming_the_key(tmp_path):
    cfg = write_config(
        tmp_path,
        '[retention]\n[[retention.rules]]\nname = "x"\n[retention.store]\npath = "/v/%u"\n',
    )
    r = run(cfg, "retention", "status")
    assert r.exit_code == 2 and "retention.rules[0].age" in r.output


def test_retention_off_is_said_plainly(tmp_path):
    cfg = write_config(tmp_path, '[server]\nhostname = "mx.example"\n')
    r = run(cfg, "retention", "run")
    assert r.exit_code == 1 and "retention is off" in r.output


def test_config_option_after_the_subcommand(setup):
    cfg, _mb, _ = setup
    r = CliRunner().invoke(cli, ["retention", "status", "-c", str(cfg)])
    assert r.exit_code == 0 and "trash" in r.output


def test_registered_in_mailds_own_cli():
    from maild.cli import main

    for name in ("retention", "mailbox", "access"):
        assert name in main.commands


def test_progress_bar_on_a_terminal(setup, monkeypatch):
    cfg, mb, _ = setup
    import maild.retention.cli as rcli

    monkeypatch.setattr(rcli, "_is_terminal", lambda: True)
    seen = []
    real = click.progressbar

    def bar(*a, **k):
        seen.append(k.get("length"))
        return real(*a, **k)

    monkeypatch.setattr(rcli.click, "progressbar", bar)
    r = run(cfg, "retention", "run", "trash")
    assert r.exit_code == 0 and seen == [1]  # one mailbox: alice
