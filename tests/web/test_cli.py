"""`maild optin unsubscribe-url` / `unsubscribe-key` against a real store."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from click.testing import CliRunner

from maild.cli import main
from maild.components import load
from maild.web import oneclick
from tests.harness.maild import render
from tests.web.conftest import BASE, LIST, POLICY


def config_file(tmp_path: Path, **web: object) -> Path:
    doc = copy.deepcopy(POLICY)
    doc["server"]["state"] = str(tmp_path / "state.db")
    doc["web"] = web
    path = tmp_path / "policies.toml"
    path.write_text(render(doc))
    return path


def run(path: Path, *args: str):
    return CliRunner().invoke(main, ["optin", *args, "-c", str(path)])


def test_url_and_key_agree_and_are_stable(tmp_path):
    path = config_file(tmp_path, enabled=True, base_url=BASE)
    r = run(path, "unsubscribe-url", LIST, "Bob@Example.org", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["list_unsubscribe_post"] == "List-Unsubscribe=One-Click"
    key = bytes.fromhex(run(path, "unsubscribe-key", LIST).output.strip())
    assert doc["url"] == oneclick.url(BASE, key, LIST, "bob@example.org")
    assert run(path, "unsubscribe-url", LIST, "bob@example.org").output.strip() == doc["url"]
    assert load(path)  # the file the CLI read is valid


def test_mistakes_are_named(tmp_path):
    path = config_file(tmp_path)
    r = run(path, "unsubscribe-url", LIST, "bob@example.org")
    assert r.exit_code == 2 and "[web] base_url is not set" in r.output
    path = config_file(tmp_path, enabled=True, base_url=BASE)
    r = run(path, "unsubscribe-url", "nope.example", "bob@example.org")
    assert r.exit_code == 2 and "no registered list 'nope.example'" in r.output
    r = run(path, "unsubscribe-url", LIST, "not-an-address")
    assert r.exit_code == 2 and "is not an email address" in r.output
