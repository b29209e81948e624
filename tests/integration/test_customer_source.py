"""[customer_source] under a real `maild serve` in front of a real Postfix (and PostgreSQL).

The customer that moves is "mover" on 127.0.0.11, a stranger until its file says
otherwise; policies.toml's acme (127.0.0.9) stays as shipped-style [[customers]].
"""

from __future__ import annotations

import shutil

from tests.customers.conftest import customer_toml, write_customer
from tests.harness.clients import swaks
from tests.harness.maild import Maild
from tests.harness.waits import wait_until
from tests.integration.conftest import CUSTOMER_IP, front_policy

MOVER = "127.0.0.11"


def _send(maild: Maild, bind: str, frm: str = "boss@mover.example"):
    return swaks(maild.port, frm=frm, to="partner@outside.example", bind=bind)


def _published(maild: Maild, n: int) -> None:
    """Wait for the n-th 'customers: in force' line: a refresh has been published."""
    assert wait_until(lambda: maild.log().count("customers: in force:") >= n, timeout=60), (
        maild.log()[-3000:]
    )


def test_files_source_with_ten_thousand_files_changes_without_a_reload(postfix, tmp_path):
    d = tmp_path / "customers.d"
    d.mkdir()
    for i in range(10_000):
        write_customer(d, f"c{i}", customer_toml(i))
    write_customer(d, "mover", 'networks = ["10.200.0.1/32"]\ndomains = ["mover.example"]\n')
    policy = front_policy(postfix.reinject_port)
    policy["customer_source"] = {"type": "files", "path": str(d), "refresh": "1s"}
    m = Maild(tmp_path / "m", policy).start(timeout=120)
    try:
        _published(m, 1)
        assert "customers: in force: 10002 (policies.toml=1 files=10001)" in m.log()
        r = _send(m, MOVER)
        assert r.rcpt_codes == [554], r.output  # a stranger may not relay
        before = len(postfix.outside_messages())
        write_customer(d, "mover", 'networks = ["127.0.0.11/32"]\ndomains = ["mover.example"]\n')
        _published(m, 2)
        r = _send(m, MOVER)
        assert r.data_code == 250, r.output
        postfix.wait_for_outside(before + 1)
        assert "customer=mover by=network" in m.wait_log("from=<boss@mover.example>")
        out = m.cli("customer", "show", "mover")
        assert f"source: file {d / 'mover.toml'}" in out.stdout, out.stdout + out.stderr

        # Sanctions work on a customer from a file as on one from policies.toml.
        assert m.cli("customer", "block", "mover", "--reason", "spam run").returncode == 0
        r = _send(m, MOVER)
        assert r.data_code != 250 and 554 in r.rcpt_codes, r.output
        assert m.cli("customer", "unblock", "mover").returncode == 0
        assert _send(m, MOVER).data_code == 250

        # A malformed file: logged with its name, key and fix; the version in force stays.
        (d / "mover.toml").write_text('networks = ["127.0.0.11/33"]\n')
        m.wait_log(f'customers: {d / "mover.toml"}: networks[0] = "127.0.0.11/33"', timeout=30)
        assert _send(m, MOVER).data_code == 250

        # The directory vanishes: the customers stay, the cause is logged.
        shutil.rmtree(d)
        m.wait_log(f"customers: cannot read {d}: No such file or directory", timeout=30)
        assert _send(m, MOVER).data_code == 250
        # policies.toml's [[customers]] work as ever
        assert _send(m, CUSTOMER_IP, frm="boss@acme.example").data_code == 250
        assert m.proc is not None and m.proc.poll() is None

        # Back with only the mover: a shrink past max_shrink waits for a reload.
        d.mkdir()
        write_customer(d, "mover", 'networks = ["127.0.0.11/32"]\n')
        m.wait_log("customers: refresh refused", timeout=30)
        assert _send(m, MOVER).data_code == 250
        r = m.cli("reload")
        assert r.returncode == 0, r.stdout + r.stderr
        m.wait_log("customers: in force: 2 (policies.toml=1 files=1)", timeout=30)
        assert _send(m, MOVER).data_code == 250
    finally:
        m.stop()


def test_postgresql_source_survives_a_restart_during_an_outage(postfix, tmp_path):
    from tests.customers.test_postgresql import QUERY, SCHEMA
    from tests.harness.postgres import Postgres, need_postgres

    pg = Postgres(need_postgres()).start()
    try:
        url = pg.create_db("billing")
        pg.psql(SCHEMA, "billing")
        pg.psql(
            "INSERT INTO accounts (handle) VALUES ('mover');"
            "INSERT INTO account_ips VALUES (4, '127.0.0.11/32');"
            "INSERT INTO account_domains VALUES (4, 'mover.example')",
            "billing",
        )
        policy = front_policy(postfix.reinject_port)
        policy["customer_source"] = {
            "type": "postgresql",
            "dsn": url,
            "query": " ".join(QUERY.split()),
            "refresh": "1s",
        }
        m = Maild(tmp_path / "m", policy).start(timeout=60)
        try:
            _published(m, 1)
            assert _send(m, MOVER).data_code == 250
            out = m.cli("customers")
            assert "mover                postgresql" in out.stdout, out.stdout + out.stderr
            pg.stop()
            m.wait_log("customers: cannot query postgresql", timeout=30)
            assert _send(m, MOVER).data_code == 250
        finally:
            m.stop()
        m.start(timeout=60)  # a restart during the outage
        try:
            m.wait_log("using the snapshot")
            assert _send(m, MOVER).data_code == 250
            assert "customer=mover by=network" in m.wait_log("from=<boss@mover.example>")
        finally:
            m.stop()
    finally:
        pg.remove()
