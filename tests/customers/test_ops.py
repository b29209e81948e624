"""doctor and report say where the customers come from and what in the source does not load."""

from __future__ import annotations

import time

from maild.components import load
from maild.customers.ops import doctor_checks
from maild.report import as_text, build
from tests.customers.conftest import customer_toml, write_customer


def _setup(tmp_path):
    d = tmp_path / "customers.d"
    d.mkdir()
    write_customer(d, "shop", customer_toml(1))
    (tmp_path / "policies.toml").write_text(
        '[server]\nstate = "state.db"\n[postmaster]\ndomains = ["hosted.example"]\n'
        '[[customers]]\nname = "acme"\nnetworks = ["192.0.2.0/24"]\n'
        '[customer_source]\ntype = "files"\npath = "customers.d"\n'
    )
    return d


def test_doctor_counts_customers_by_source_and_names_a_broken_file(tmp_path):
    d = _setup(tmp_path)
    (f,) = doctor_checks(load(str(tmp_path / "policies.toml")))
    assert (f.level, f.name) == ("OK", "customers")
    assert "2 in force (policies.toml=1 files=1)" in f.message and str(d) in f.message
    (d / "bad.toml").write_text('contact = "nobody"\n')
    (f,) = doctor_checks(load(str(tmp_path / "policies.toml")))
    assert f.level == "WARN" and f'{d / "bad.toml"}: contact = "nobody"' in f.message
    (d / "bad.toml").unlink()
    d.rename(tmp_path / "elsewhere")
    (f,) = doctor_checks(load(str(tmp_path / "policies.toml")))
    assert f.level == "FAIL" and f"cannot read {d}" in f.message


async def test_report_says_where_each_customer_comes_from(tmp_path):
    from maild.components import WIRING

    _setup(tmp_path)
    config = load(str(tmp_path / "policies.toml"))
    store = await WIRING.open_store(config.server.state, config.path)
    try:
        now = time.time()
        for customer in ("acme", "shop", "gone"):
            await store.execute(
                "INSERT INTO decisions (ts, session, stage, action, code, status, reason, "
                "rule, client_name, client_addr, customer, sender, recipient) "
                "VALUES (?, 's', 'DATA', 'relay', 250, '2.0.0', '', '-', 'h', '192.0.2.1', ?, "
                "'a@b.example', 'c@d.example')",
                (now, customer),
            )
        rep = await build(store, config, now - 60)
    finally:
        await store.close()
    text = as_text(rep)
    assert "acme" in text and "; policies.toml" in text
    assert "shop" in text and "; files" in text
    assert {c["customer"]: c["source"] for c in rep["customers"]} == {
        "acme": "policies.toml",
        "shop": "files",
        "gone": "-",
    }


async def test_customers_lists_each_ones_state_strikes_and_source(tmp_path):
    import asyncio
    import json

    from click.testing import CliRunner

    from maild.antispam.sanctions import set_state
    from maild.cli import main
    from maild.components import WIRING

    d = _setup(tmp_path)
    write_customer(d, "quiet", customer_toml(2))
    config = load(str(tmp_path / "policies.toml"))
    store = await WIRING.open_store(config.server.state, config.path)
    try:
        await set_state(store, "shop", "blocked", "spam run", "test")
        for _ in range(2):
            await store.execute(
                "INSERT INTO strikes (ts, customer, rule, reason, session) "
                "VALUES (?, 'shop', 'bulk', 'r', 's')",
                (time.time(),),
            )
        await store.execute(
            "INSERT INTO ratelimit_counters (key, value, ts, period) VALUES (?, 7, ?, 3600)",
            ("cust:shop#1h", time.time()),
        )
    finally:
        await store.close()
    out = await asyncio.to_thread(
        CliRunner().invoke, main, ["customers", "-c", str(tmp_path / "policies.toml"), "--json"]
    )
    rows = {r["name"]: r for r in json.loads(out.output)}
    assert (rows["shop"]["state"], rows["shop"]["strikes_7d"]) == ("blocked", 2)
    assert rows["shop"]["source"] == f"files:{d / 'shop.toml'}"
    assert rows["shop"]["messages"][0]["count"] == 7
    assert (rows["quiet"]["state"], rows["quiet"]["strikes_7d"]) == ("ok", 0)
    assert rows["acme"]["source"].endswith("policies.toml")
