"""`maild optin ...` against a real store and a real SMTP server as the downstream."""

from __future__ import annotations

import copy
import json
import logging
import sqlite3
import zipfile
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner

from maild.cli import main
from tests.harness.maild import render
from tests.harness.ports import free_port
from tests.optin.conftest import POLICY

LIST = "news.acme.example"


class Sink:
    """The downstream: records what maild submitted."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Ok: queued as TEST"


@pytest.fixture
def sink():
    s = Sink()
    ctl = Controller(s, hostname="127.0.0.1", port=free_port())
    ctl.start()
    s.port = ctl.port  # type: ignore[attr-defined]
    yield s
    ctl.stop()


def write_config(tmp_path: Path, downstream_port: int) -> Path:
    doc = copy.deepcopy(POLICY)
    doc["server"].update(
        {"state": str(tmp_path / "state.db"), "downstream": f"127.0.0.1:{downstream_port}"}
    )
    p = tmp_path / "policies.toml"
    p.write_text(render(doc))
    return p


@pytest.fixture
def cfg(tmp_path, sink) -> Path:
    return write_config(tmp_path, sink.port)


@pytest.fixture
def cli(cfg):
    """`maild ...` in process. main() points the 'maild' logger at syslog and stops it
    propagating; put it back afterwards, so later tests' caplog still sees records."""
    logger = logging.getLogger("maild")
    saved = (list(logger.handlers), logger.propagate, logger.level)

    def run(*args: str) -> object:
        return CliRunner().invoke(main, [*args, "-c", str(cfg)], catch_exceptions=False)

    yield run
    for h in list(logger.handlers):
        if h not in saved[0]:
            logger.removeHandler(h)
            h.close()
    for h in saved[0]:
        if h not in logger.handlers:
            logger.addHandler(h)
    logger.propagate, logger.level = saved[1], saved[2]


def js(result) -> object:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_request_sends_the_confirmation_and_limits_repeats(cli, sink, tmp_path):
    form = tmp_path / "form.txt"
    form.write_text("POST /subscribe email=bob@example.org\n")
    out = js(
        cli(
            "optin",
            "request",
            LIST,
            "bob@example.org",
            "--ip",
            "198.51.100.7",
            "--evidence",
            str(form),
            "--json",
        )
    )
    assert out["sent"] and out["seq"] == 1 and out["downstream_reply"].startswith("250")
    frm, rcpts, content = sink.messages[-1]
    assert (frm, rcpts) == ("news@acme.example", ["bob@example.org"])
    assert b"Reply-To: confirm+" in content and b"198.51.100.7" in content
    st = js(cli("optin", "status", "bob@example.org", "--json"))
    assert st[0]["state"] == "pending" and st[0]["events"][0]["ip"] == "198.51.100.7"
    for _ in range(2):
        assert cli("optin", "request", LIST, "bob@example.org").exit_code == 0
    r = cli("optin", "request", LIST, "bob@example.org")
    assert r.exit_code == 1 and "subscription bombing" in r.output and len(sink.messages) == 3


def test_request_errors_are_readable(cli, cfg, tmp_path):
    r = cli("optin", "request", "nope.example", "bob@example.org")
    assert r.exit_code == 2 and "no registered list 'nope.example'" in r.output
    r = cli("optin", "request", LIST, "not an address")
    assert r.exit_code == 1 and "is not an email address" in r.output
    # downstream down: the request is recorded, the operator told the mail did not go
    write_config(tmp_path, free_port())
    r = cli("optin", "request", LIST, "carol@example.org")
    assert r.exit_code == 1 and "NOT SENT" in r.output, r.output
    assert "request recorded" in r.output


def test_add_import_revoke_and_the_owner_cannot_undo_a_revocation(cli, sink, tmp_path):
    r = cli(
        "optin",
        "add",
        LIST,
        "amy@example.org",
        "--source",
        "shop signup",
        "--obtained",
        "2999-01-01",
    )
    assert r.exit_code == 1 and "in the future" in r.output
    assert (
        cli(
            "optin",
            "add",
            LIST,
            "amy@example.org",
            "--source",
            "shop signup",
            "--obtained",
            "2024-01-01",
        ).exit_code
        == 0
    )
    f = tmp_path / "subs.csv"
    f.write_text(
        "# exported from the old list\nben@example.org,2023-05-01\n"
        '"cat@example.org";x\namy@example.org\nnot-an-address\n'
    )
    out = js(
        cli(
            "optin",
            "import",
            LIST,
            str(f),
            "--source",
            "old list",
            "--obtained",
            "2023-06-01",
            "--json",
        )
    )
    assert out["imported"] == 2 and "already confirmed" in out["skipped"]["amy@example.org"]
    out = js(
        cli(
            "optin",
            "revoke",
            LIST,
            "ben@example.org",
            "--channel",
            "one-click",
            "--ip",
            "198.51.100.9",
            "--json",
        )
    )
    assert out["notified"] and out["previous_state"] == "confirmed"
    frm, rcpts, content = sink.messages[-1]
    assert frm in ("", "<>") and rcpts == ["ben@example.org"]
    assert b"one-click unsubscribe" in content
    r = cli("optin", "add", LIST, "ben@example.org", "--source", "x", "--obtained", "2024-01-01")
    assert r.exit_code == 1 and "an owner cannot re-add" in r.output
    subs = js(cli("optin", "subscribers", LIST, "--json"))
    assert {s["address"]: s["state"] for s in subs} == {
        "amy@example.org": "confirmed",
        "ben@example.org": "revoked",
        "cat@example.org": "confirmed",
    }
    assert (
        js(cli("optin", "subscribers", LIST, "--state", "revoked", "--json"))[0]["address"]
        == "ben@example.org"
    )
    n = len(sink.messages)
    assert cli("optin", "revoke", LIST, "ben@example.org").exit_code == 0
    assert len(sink.messages) == n  # told once


def test_lists_register_unregister(cli):
    rows = js(cli("optin", "lists", "--json"))
    assert [r["id"] for r in rows] == ["deals.other.example", LIST]
    assert rows[1]["problems"] == [] and rows[1]["source"] == "config"
    r = cli(
        "optin",
        "list",
        "register",
        "tips.acme.example",
        "--customer",
        "acme",
        "--owner",
        "tips@acme.example",
        "--domain",
        "lists.hosted.example",
        "--return-path",
        "tips-bounces+*@lists.hosted.example",
        "--consent-text",
        "Tips.",
    )
    assert r.exit_code == 0, r.output
    r = cli(
        "optin",
        "list",
        "register",
        "tips.acme.example",
        "--customer",
        "acme",
        "--owner",
        "tips@acme.example",
        "--consent-text",
        "Tips.",
    )
    assert r.exit_code == 1 and "--replace" in r.output
    r = cli(
        "optin",
        "list",
        "register",
        LIST,
        "--customer",
        "acme",
        "--owner",
        "n@acme.example",
        "--consent-text",
        "x",
    )
    assert r.exit_code == 1 and "change it there" in r.output
    r = cli(
        "optin",
        "list",
        "register",
        "x.example",
        "--customer",
        "nobody",
        "--owner",
        "n@acme.example",
        "--consent-text",
        "x",
    )
    assert r.exit_code == 2 and "no customer named 'nobody'" in r.output
    assert "tips.acme.example (store)" in cli("optin", "lists").output
    assert cli("optin", "list", "unregister", "tips.acme.example").exit_code == 0
    assert cli("optin", "list", "unregister", "tips.acme.example").exit_code == 1


def test_evidence_and_verify(cli, cfg, tmp_path):
    assert (
        cli(
            "optin",
            "add",
            LIST,
            "dan@example.org",
            "--source",
            "fair stand, paper form",
            "--obtained",
            "2024-02-02",
        ).exit_code
        == 0
    )
    out = js(cli("optin", "evidence", "dan@example.org", "--out", str(tmp_path / "ev"), "--json"))
    assert out["verified"] and out["events"] == 1 and out["lists"] == [LIST]
    with zipfile.ZipFile(out["path"]) as z:
        ev = json.loads(z.read("evidence.json"))["events"][0]
    assert ev["kind"] == "owner-add" and ev["detail"]["attestation"] == {
        "source": "fair stand, paper form",
        "obtained": "2024-02-02",
    }
    r = cli("optin", "evidence", "nobody@example.org", "--out", str(tmp_path / "ev"))
    assert r.exit_code == 1 and "no consent events" in r.output
    assert "OK: 1 chain(s) checked" in cli("optin", "verify").output
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("UPDATE optin_events SET address = 'eve@example.org'")
    r = cli("optin", "verify", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["ok"] is False
    r = cli("optin", "status", "nobody@example.org")
    assert r.exit_code == 1 and "no consent events" in r.output
