"""The CLI: readable errors with exit code 2, never a traceback; --help everywhere."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from maild.cli import main

MAILD = str(Path(sys.executable).parent / "maild")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MAILD, *args], capture_output=True, text=True, timeout=60)


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("maild, version ")


def test_check_config_ok():
    r = run("check-config", "-c", "policies.toml")
    assert r.returncode == 0 and "OK" in r.stdout


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[server\nmode = 1", "TOML syntax error"),
        ('[server]\nmode = "sideways"\n', 'server.mode = "sideways": expected one of'),
        (
            '[server]\nlisten = 25\n[postmaster]\ndomains = ["x"]\n',
            "server.listen = 25: expected HOST:PORT",
        ),
        ("[[customers]]\nnetworks = ['bad']\n", "customers[0].name is missing"),
    ],
)
def test_broken_config_is_exit_2_with_a_readable_error(tmp_path, text, needle):
    p = tmp_path / "p.toml"
    p.write_text(text)
    for cmd in (["check-config"], ["serve", "--log", "stderr"], ["log"]):
        r = run(*cmd, "-c", str(p))
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr + r.stdout


def test_missing_config_file(tmp_path):
    r = run("-c", str(tmp_path / "none.toml"), "check-config")
    assert r.returncode == 2 and "cannot read the file" in r.stderr


def test_every_command_has_help():
    runner = CliRunner()

    def walk(group, path):
        for name, cmd in group.commands.items():
            res = runner.invoke(main, [*path, name, "--help"])
            assert res.exit_code == 0 and len(res.output) > 80, (path, name, res.output)
            if hasattr(cmd, "commands"):
                walk(cmd, [*path, name])

    walk(main, [])


def seed_decisions(db: Path, decisions: list[tuple[str, str, str]]) -> None:
    """Write (action, rule, customer) decisions two hours old, as the daemon's DecisionLog does."""
    import asyncio

    from maild.components import open_store
    from maild.store.core import DecisionLog, DecisionRow

    async def seed():
        store = await open_store(str(db))
        dl = DecisionLog(store)
        for i, (action, rule, customer) in enumerate(decisions):
            dl.add(
                DecisionRow(
                    ts=time.time() - 7200 + i,
                    session=f"S{i}",
                    stage="RCPT",
                    action=action,
                    code=250,
                    status="2.0.0",
                    reason="r",
                    rule=rule,
                    client_name="unknown",
                    client_addr="192.0.2.1",
                    customer=customer,
                    sender="a@b.example",
                    recipient=f"r{i}@h.example",
                )
            )
        await dl.stop()
        await store.close()

    asyncio.run(seed())


def test_log_filters_and_json(tmp_path):
    db = tmp_path / "state.db"
    (tmp_path / "p.toml").write_text(
        f'[server]\nstate = "{db}"\n[postmaster]\ndomains = ["h.example"]\n'
    )
    seed_decisions(
        db, [("relay", "-", "-"), ("reject", "relay", "-"), ("tempfail", "downstream", "-")]
    )
    r = run("log", "-c", str(tmp_path / "p.toml"), "--json", "--action", "reject")
    rows = json.loads(r.stdout)
    assert r.returncode == 0 and [x["session"] for x in rows] == ["S1"]
    r = run("log", "-c", str(tmp_path / "p.toml"), "--address", "R2@h.example")
    assert "S2: tempfail: RCPT" in r.stdout and "S1" not in r.stdout
    r = run("log", "-c", str(tmp_path / "p.toml"), "--since", "1h", "--json")
    assert [x["session"] for x in json.loads(r.stdout)] == []
    r = run("log", "-c", str(tmp_path / "p.toml"), "--since", "soon")
    assert r.returncode == 2 and "expected a duration" in r.stderr


def test_log_names_an_unknown_customer_and_one_without_decisions(tmp_path):
    db = tmp_path / "state.db"
    policy = tmp_path / "p.toml"
    policy.write_text(
        f'[server]\nstate = "{db}"\n[postmaster]\ndomains = ["h.example"]\n'
        '[[customers]]\nname = "acme"\n[[customers]]\nname = "beta"\n'
    )
    # "gone" was a customer once: no longer in policies.toml, still in the decision log
    seed_decisions(db, [("relay", "-", "acme"), ("relay", "-", "gone")])
    r = run("log", "-c", str(policy), "--customer", "nosuch")
    assert r.returncode == 2 and "unknown customer nosuch (known: acme, beta;" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    r = run("log", "-c", str(policy), "--customer", "beta")
    assert (
        r.returncode == 0
        and r.stderr.strip() == "customer beta has no decisions in the state store"
    )
    r = run("log", "-c", str(policy), "--customer", "acme", "--action", "reject")
    assert r.returncode == 0 and r.stderr.strip() == "no decisions of customer acme match"
    r = run("log", "-c", str(policy), "--customer", "gone")
    assert r.returncode == 0 and "S1: relay: RCPT" in r.stdout and "customer=gone" in r.stdout
