"""Two `maild serve` nodes on one PostgreSQL: one view of each customer.

Limits hold across both nodes (within the documented over-admission bound), a block
made on one node refuses on the other, a retention run started on both nodes at once
deletes each file once, and PostgreSQL going away means 4xx, never mail accepted
unchecked, and service again once it is back.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.harness.clients import swaks
from tests.harness.maild import Maild
from tests.harness.postgres import Postgres, need_postgres
from tests.harness.waits import wait_until
from tests.integration.conftest import front_policy

NODE_CUSTOMER = "127.0.0.40"


@pytest.fixture(scope="module")
def pg():
    server = Postgres(need_postgres()).start()
    yield server
    server.remove()


def two_nodes(pg: Postgres, postfix, tmp_path, db: str, **extra) -> tuple[Maild, Maild]:
    url = pg.create_db(db)
    nodes = []
    for name in ("a", "b"):
        policy = front_policy(postfix.reinject_port, state=url)
        policy["customers"].append(
            {
                "name": "shared",
                "networks": [f"{NODE_CUSTOMER}/32"],
                "ratelimit": {"messages": ["6/1h"]},
            }
        )
        policy.update(extra)
        nodes.append(Maild(tmp_path / name, policy))
    return nodes[0], nodes[1]


def test_limit_holds_across_nodes_and_a_block_on_one_refuses_on_the_other(pg, postfix, tmp_path):
    a, b = two_nodes(pg, postfix, tmp_path, "limits")
    with a, b:
        before = len(postfix.outside_messages())
        codes = []
        for i in range(12):
            node = (a, b)[i % 2]
            r = swaks(
                node.port, frm="x@shared.example", to=f"s{i}@outside.example", bind=NODE_CUSTOMER
            )
            codes.append(r.data_code if r.data_code else (r.rcpt_codes or [0])[0])
        accepted = codes.count(250)
        # 6/1h per customer; the local allowance may over-admit at most one per node
        assert 6 <= accepted <= 8, codes
        assert set(codes) <= {250, 450}, codes
        assert postfix.wait_for_outside(before + accepted)
        # a block made through node a's CLI is in effect on a when the command returns, and
        # node b sees it at its next poll
        r = a.cli("customer", "block", "acme", "--reason", "two-node test")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == (
            f"customer acme: blocked; applied in the running daemon (pid {a.proc.pid}) on this "
            "node; other nodes sharing the state store apply it at their next poll, within 2 seconds"
        )
        assert swaks(
            a.port, frm="boss@acme.example", to="x@outside.example", bind="127.0.0.9"
        ).rcpt_codes == [554]
        assert wait_until(
            lambda: (
                swaks(
                    b.port, frm="boss@acme.example", to="x@outside.example", bind="127.0.0.9"
                ).rcpt_codes
                == [554]
            )
        )
        # postmaster still reachable through b
        assert (
            swaks(
                b.port, frm="boss@acme.example", to="postmaster@hosted.example", bind="127.0.0.9"
            ).data_code
            == 250
        )
        assert b.cli("customer", "unblock", "acme").returncode == 0
        assert wait_until(
            lambda: (
                swaks(
                    a.port, frm="boss@acme.example", to="y@outside.example", bind="127.0.0.9"
                ).data_code
                == 250
            )
        )


def test_retention_on_both_nodes_deletes_each_file_once(pg, postfix, tmp_path):
    store = tmp_path / "vmail"
    for u in range(10):
        md = store / "hosted.example" / f"user{u}" / "Maildir"
        for sub in ("cur", "new", "tmp", ".Trash/cur", ".Trash/new", ".Trash/tmp"):
            (md / sub).mkdir(parents=True)
        for i in range(20):
            (md / ".Trash" / "cur" / f"{1000 + i}.M{u}P{i}.host:2,S").write_bytes(b"x" * 50)
    retention = {
        "store": {"layout": "maildir++", "path": str(store) + "/%d/%n/Maildir"},
        "rules": [
            {
                "name": "trash-fast",
                "folders": ["\\Trash"],
                "age": "1s",
                "age_by": "saved",
                "action": "delete",
                "schedule": "manual",
            }
        ],
    }
    a, b = two_nodes(pg, postfix, tmp_path, "retention", retention=retention)
    a.write()
    b.write()
    time.sleep(1.2)
    procs = [
        subprocess.Popen(
            [*n.cli_argv("retention", "run", "trash-fast")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (a, b)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert list(store.glob("hosted.example/*/Maildir/.Trash/cur/*")) == []
    deleted = pg.psql(
        "SELECT count(*) FROM retention_deletions WHERE status = 'deleted'", "retention"
    )
    assert int(deleted.strip()) == 200  # each file recorded once, by one node


def test_postgresql_down_means_4xx_and_recovery(pg, postfix, tmp_path):
    a, _ = two_nodes(pg, postfix, tmp_path, "outage")
    with a:
        assert (
            swaks(
                a.port, frm="x@shared.example", to="o1@outside.example", bind=NODE_CUSTOMER
            ).data_code
            == 250
        )
        pg.stop()
        try:
            a.wait_log("state store", timeout=15)
            r = swaks(a.port, frm="x@shared.example", to="o2@outside.example", bind=NODE_CUSTOMER)
            # 451 4.3.0 at MAIL once the store failed (at RCPT before a call had failed)
            codes = r.codes_for("MAIL") + r.rcpt_codes
            assert r.data_code is None and any(400 <= c < 500 for c in codes), r.output
        finally:
            pg.start()
        assert wait_until(
            lambda: (
                swaks(
                    a.port, frm="x@shared.example", to="o3@outside.example", bind=NODE_CUSTOMER
                ).data_code
                == 250
            ),
            timeout=30,
        )
