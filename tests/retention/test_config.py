"""[retention] parsing: Keydata's shipped rules, CT's documented ones, and every refusal."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from maild.components import parse
from maild.config import ConfigError
from maild.retention.config import RetentionConfig, cron_for, retention_of

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "maild" / "retention" / "policies-retention.example.toml"
DOCS = REPO / "docs" / "retention.md"

STORE = {"path": "/var/vmail/%d/%n/Maildir", "root_mailboxes": ["root@*"]}


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(data)
    return e.value.problems


def rules(*rs: dict, store: dict | None = None, **top) -> dict:
    return {"retention": {"store": STORE if store is None else store, "rules": list(rs), **top}}


def test_absent_section_means_retention_off():
    cfg = parse({}).sections["retention"]
    assert isinstance(cfg, RetentionConfig)
    assert cfg.enabled is False and cfg.rules == ()


def test_shipped_example_holds_keydatas_three_rules():
    cfg = parse(tomllib.loads(EXAMPLE.read_text())).sections["retention"]
    by = {r.name: r for r in cfg.rules}
    trash, idle, root = by["trash-7d"], by["idle-60d-older-90d"], by["root-idle-90d-shrink"]
    assert (trash.action, trash.folders, trash.age, trash.age_by, trash.idle) == (
        "delete",
        ("\\Trash",),
        7 * 86400,
        "saved",
        None,
    )
    assert (idle.action, idle.folders, idle.idle, idle.age, idle.age_by) == (
        "delete",
        ("*",),
        60 * 86400,
        90 * 86400,
        "received",
    )
    assert (root.action, root.mailboxes, root.idle, root.quota) == (
        "shrink",
        "root",
        90 * 86400,
        1024 * 1024,
    )
    assert all(r.cron == "17 3 * * *" for r in cfg.rules)  # daily at daily_at


def _doc_toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S)


def test_every_toml_example_in_the_docs_parses():
    blocks = _doc_toml_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        data = tomllib.loads(block)
        if (
            "retention" in data
            and "rules" in data["retention"]
            and "store" not in data["retention"]
        ):
            data["retention"]["store"] = STORE
        parse(data)


def test_cts_rules_from_the_docs():
    ct = [b for b in _doc_toml_blocks() if "pop3-trim" in b]
    assert ct, "docs/retention.md shows CT's rules"
    data = tomllib.loads(ct[0])
    data["retention"].setdefault("store", STORE)
    cfg = parse(data).sections["retention"]
    by = {r.name: r for r in cfg.rules}
    assert by["older-60d"].action == "delete" and by["older-60d"].age == 60 * 86400
    assert by["older-60d"].idle is None and by["older-60d"].age_by == "received"
    assert by["pop3-trim"].action == "trim" and by["pop3-trim"].folders == ("INBOX",)
    assert by["pop3-trim"].max_size == 500 * 1024 * 1024


def test_relative_paths_resolve_against_the_config_directory(tmp_path):
    p = tmp_path / "policies.toml"
    p.write_text('[retention.store]\npath = "/v/%u"\nlock_dir = "locks"\n')
    from maild.components import load

    cfg = retention_of(load(p))
    assert cfg.resolve(cfg.store.lock_dir) == str(tmp_path / "locks")
    assert cfg.resolve("/abs") == "/abs"
    p.write_text('[server]\nstate = "/srv/maild/state.db"\n[retention.store]\npath = "/v/%u"\n')
    assert retention_of(load(p)).store.lock_dir == "/srv/maild/retention-locks"


@pytest.mark.parametrize(
    "rule, key, says",
    [
        (
            {"name": "x", "folders": ["*"], "action": "delete"},
            "retention.rules[0].age",
            "delete every message",
        ),
        ({"name": "x", "age": "7d"}, "retention.rules[0].age_by", '"saved"'),
        ({"name": "x", "age": "7d", "age_by": "atime"}, "retention.rules[0].age_by", '"received"'),
        (
            {"name": "x", "action": "shrink", "quota": "1MB"},
            "retention.rules[0].idle",
            "shrink every mailbox",
        ),
        ({"name": "x", "action": "shrink", "idle": "90d"}, "retention.rules[0].quota", "1MB"),
        ({"name": "x", "action": "trim"}, "retention.rules[0].max_size", "500MB"),
        (
            {"name": "x", "action": "purge", "age": "1d", "age_by": "saved"},
            "retention.rules[0].action",
            '"delete"',
        ),
        (
            {"name": "x", "age": "1d", "age_by": "saved", "schedule": "sometimes"},
            "retention.rules[0].schedule",
            "crontab",
        ),
        (
            {"name": "x", "age": "1d", "age_by": "saved", "schedule": "61 3 * * *"},
            "retention.rules[0].schedule",
            "crontab",
        ),
        (
            {"name": "x", "age": "seven days", "age_by": "saved"},
            "retention.rules[0].age",
            "duration",
        ),
        (
            {"name": "x", "age": "1d", "age_by": "saved", "foldrs": ["*"]},
            "retention.rules[0].foldrs",
            "unknown key",
        ),
        (
            {"name": "bad name", "age": "1d", "age_by": "saved"},
            "retention.rules[0].name",
            "letters",
        ),
        (
            {"name": "x", "age": "1d", "age_by": "saved", "quota": "1MB"},
            "retention.rules[0].quota",
            "shrink",
        ),
        (
            {"name": "x", "action": "shrink", "idle": "90d", "quota": "1MB", "age": "1d"},
            "retention.rules[0].age",
            "oldest first",
        ),
        (
            {"name": "x", "age": "1d", "age_by": "saved", "mailboxes": "some"},
            "retention.rules[0].mailboxes",
            '"root"',
        ),
    ],
)
def test_bad_rules_are_refused_naming_the_key(rule, key, says):
    found = problems(rules(rule))
    assert any(p.startswith(key) and says in p for p in found), found


def test_duplicate_rule_names_are_refused():
    r = {"name": "x", "age": "1d", "age_by": "saved"}
    assert any("retention.rules[1].name" in p and "no other" in p for p in problems(rules(r, r)))


@pytest.mark.parametrize(
    "store, key, says",
    [
        ({"path": "var/vmail/%u"}, "retention.store.path", "absolute"),
        ({"path": "/var/vmail/%d"}, "retention.store.path", "%u"),
        ({"path": "/var/vmail/%x/%u"}, "retention.store.path", "only variables"),
        ({"path": "/v/%u", "layout": "mbox"}, "retention.store.layout", '"maildir++"'),
        ({"path": "/v/%u", "lyout": "fs"}, "retention.store.lyout", "unknown key"),
        ({}, "retention.store.path", "required"),
    ],
)
def test_bad_store_settings_are_refused(store, key, says):
    found = problems(rules({"name": "x", "age": "1d", "age_by": "saved"}, store=store))
    assert any(p.startswith(key) and says in p for p in found), found


def test_root_rule_needs_root_mailboxes():
    r = {"name": "x", "action": "shrink", "idle": "90d", "quota": "1MB", "mailboxes": "root"}
    found = problems(rules(r, store={"path": "/v/%u"}))
    assert any("root_mailboxes" in p for p in found), found


def test_shrink_needs_somewhere_to_write_the_quota():
    r = {"name": "x", "action": "shrink", "idle": "90d", "quota": "1MB"}
    found = problems(rules(r, quota={"maildirsize": False}))
    assert any(p.startswith("retention.quota") and "dovecot_userdb" in p for p in found), found


def test_all_problems_are_reported_together():
    found = problems(rules({"name": "a"}, {"name": "b", "action": "trim"}, daily_at="25:00"))
    assert len(found) >= 3


def test_special_use_aliases_can_be_extended():
    data = rules(
        {"name": "x", "folders": ["\\Trash"], "age": "7d", "age_by": "saved"},
        store=STORE | {"special_use": {"Trash": ["Papierkorb", "Trash"]}},
    )
    cfg = parse(data).sections["retention"]
    assert cfg.store.aliases("Trash") == ("Papierkorb", "Trash")
    assert cfg.store.aliases("Junk")  # defaults kept


def test_schedule_words():
    assert cron_for("daily", "03:17") == "17 3 * * *"
    assert cron_for("hourly", "03:17") == "17 * * * *"
    assert cron_for("weekly", "03:17") == "17 3 * * sun"
    assert cron_for("manual", "03:17") == ""
    assert cron_for("5 4 * * *", "03:17") == "5 4 * * *"
