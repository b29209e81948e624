"""Operating maild against real Postfix: doctor, postmaster check, report, status, reload."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time

import pytest

from tests.harness.clients import swaks
from tests.harness.maild import Maild
from tests.harness.ports import free_port
from tests.harness.postfix import Postfix
from tests.integration.conftest import HOSTED, STRANGER, front_policy, need


def doctor(m: Maild, pf: Postfix) -> tuple[int, dict[str, list[str]]]:
    r = m.cli("doctor", "--postfix-config", str(pf.etc))
    lines: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        mm = re.match(r"^(OK|WARN|FAIL)\s+([\w-]+):", line)
        if mm:
            lines.setdefault(mm.group(2), []).append(mm.group(1))
    return r.returncode, lines


def before_queue(root, **pf_args) -> tuple[Postfix, Maild]:
    port = free_port()
    pf_args.setdefault("proxy_filter", f"127.0.0.1:{port}")
    pf = Postfix(root / "pf", hosted_domains=HOSTED, **pf_args)
    m = Maild(
        root / "m",
        front_policy(pf.reinject_port, mode="before-queue", trusted_upstreams=["127.0.0.1/32"]),
        port=port,
    )
    # a DNS server that refuses nothing is not needed here: point [dns] at a closed port
    # only in the test that wants a DNS failure.
    return pf, m


def test_doctor_on_a_correctly_wired_postfix(tmp_path):
    need("postfix")
    pf, m = before_queue(
        tmp_path, proxy_timeout="100s", main_cf={"smtpd_sasl_authenticated_header": "yes"}
    )
    with pf, m:
        rc, lines = doctor(m, pf)
        for name in (
            "config",
            "state",
            "daemon",
            "listen",
            "downstream",
            "postfix-reinject",
            "postfix-proxy-filter",
            "postfix-proxy-timeout",
        ):
            assert lines.get(name) == ["OK"], (name, lines)
        assert "postfix-sasl-header" not in lines
        assert rc in (0, 1)  # only environment warnings (no systemd unit here) may remain


@pytest.mark.parametrize(
    "case",
    ["no-proxy-filter", "short-proxy-timeout", "no-xforward", "reinject-loops", "downstream-down"],
)
def test_doctor_reproduces_each_failure(tmp_path, case):
    need("postfix")
    args: dict = {"proxy_timeout": "100s"}
    if case == "no-proxy-filter":
        args["proxy_filter"] = None
    if case == "short-proxy-timeout":
        args["proxy_timeout"] = "15s"  # the test policy's downstream_timeout is 20s
    if case == "no-xforward":
        args["reinject_options"] = {"smtpd_authorized_xforward_hosts": "192.0.2.1"}
    if case == "reinject-loops":
        args["reinject_options"] = {"smtpd_proxy_filter": "127.0.0.1:9"}
    if case == "no-proxy-filter":
        pf = Postfix(tmp_path / "pf", hosted_domains=HOSTED, proxy_timeout="100s")
        m = Maild(tmp_path / "m", front_policy(pf.reinject_port, mode="before-queue"))
    else:
        pf, m = before_queue(tmp_path, **args)
    with pf, m:
        if case == "downstream-down":
            pf.stop()
        rc, lines = doctor(m, pf)
    expected = {
        "no-proxy-filter": ("postfix-proxy-filter", "FAIL"),
        "short-proxy-timeout": ("postfix-proxy-timeout", "FAIL"),
        "no-xforward": ("downstream", "WARN"),
        "reinject-loops": ("postfix-reinject", "FAIL"),
        "downstream-down": ("downstream", "FAIL"),
    }[case]
    assert expected[1] in lines.get(expected[0], []), (case, lines)
    assert rc == {"FAIL": 2, "WARN": 1}[expected[1]] or rc == 2


def test_doctor_reports_postconfs_own_error_for_a_config_dir_without_main_cf(tmp_path):
    """postconf exists but cannot read the configuration: say what postconf said and point
    at --postfix-config, not "install postfix"."""
    need("postconf")
    pf = Postfix(tmp_path / "pf", hosted_domains=HOSTED)
    pf.write_config()
    (pf.etc / "main.cf").unlink()
    m = Maild(tmp_path / "m", front_policy(pf.reinject_port))
    m.write()
    r = m.cli("doctor", "--postfix-config", str(pf.etc))
    line = next(x for x in r.stdout.splitlines() if x.startswith("WARN postfix:"))
    assert re.search(
        rf"postconf -c {re.escape(str(pf.etc))} failed: \S*postconf: fatal: open "
        rf"{re.escape(str(pf.etc))}/main.cf: No such file or directory$",
        line,
    ), r.stdout
    fix = r.stdout.splitlines()[r.stdout.splitlines().index(line) + 1]
    assert "--postfix-config DIR" in fix and "install postfix" not in fix, r.stdout


def test_postmaster_check_finds_a_domain_whose_postfix_refuses_postmaster(tmp_path):
    need("postfix")
    pf = Postfix(
        tmp_path / "pf",
        hosted_domains=HOSTED + ["bad.example"],
        reinject_options={
            "smtpd_recipient_restrictions": "check_recipient_access,inline:{postmaster@bad.example=REJECT},permit_mynetworks,reject"
        },
    )
    policy = front_policy(pf.reinject_port)
    policy["postmaster"]["domains"] = ["hosted.example", "bad.example"]
    with pf, Maild(tmp_path / "m", policy) as m:
        r = m.cli("postmaster", "check", "--json")
        rows = {row["address"]: row for row in json.loads(r.stdout)}
        assert r.returncode == 1
        assert rows["postmaster@bad.example"]["postfix"]["code"] == 554
        assert (
            rows["postmaster@bad.example"]["maild"]["code"] == 554
        )  # maild relays Postfix's answer
        assert rows["abuse@bad.example"]["postfix"]["code"] == 250
        assert rows["postmaster@hosted.example"]["maild"]["code"] == 250
        text = m.cli("postmaster", "check").stdout
        assert re.search(r"postmaster@bad\.example: maild=FAIL\(554 .*postfix=FAIL\(554", text), (
            text
        )
        # nothing was delivered by the probes
        pf.wait_queue_empty()
        assert pf.count_all() == 0


def test_report_figures_equal_what_was_sent(postfix, tmp_path):
    policy = front_policy(postfix.reinject_port)
    policy["customers"].append(
        {"name": "reporter", "networks": ["127.0.0.30/32"], "ratelimit": {"messages": ["2/1h"]}}
    )
    with Maild(tmp_path / "m", policy) as m:
        for i in range(3):
            swaks(m.port, frm="a@reporter.example", to=f"r{i}@outside.example", bind="127.0.0.30")
        for _ in range(2):
            swaks(m.port, frm="x@outside.example", to="bob@hosted.example", bind=STRANGER)
        swaks(m.port, frm="x@outside.example", to="relay@elsewhere.example", bind=STRANGER)
        time.sleep(1.5)  # the decision log is flushed every 0.5 s
        rep = json.loads(m.cli("report", "--since", "1h", "--json").stdout)
        assert rep["relayed"]["messages"] == 4
        refused = {(x["rule"], x["action"]): x["count"] for x in rep["refused"]}
        assert refused == {("ratelimit", "tempfail"): 1, ("relay", "reject"): 1}
        per = {c["customer"]: c for c in rep["customers"]}
        assert per["reporter"]["relayed"] == 2 and per["reporter"]["tempfailed"] == 1
        assert per["-"]["relayed"] == 2 and per["-"]["rejected"] == 1
        top = {(s["customer"], s["sender"]): s["messages"] for s in rep["top_senders"]}
        assert top[("reporter", "a@reporter.example")] == 2
        assert [s["action"] for s in rep["sanctions"]] == ["warn"]
        text = m.cli("report", "--since", "1h").stdout
        assert "Relayed: 4 messages" in text and "reporter: warn" in text
        # --mail sends it to postmaster through the downstream
        assert m.cli("report", "--since", "1h", "--mail").returncode == 0
        msgs = postfix.wait_for_messages("postmaster@hosted.example", 1)
        assert any(b"[maild] Daily report" in x and b"Relayed: 4 messages" in x for x in msgs)


def test_status_and_reload(postfix, tmp_path):
    with Maild(tmp_path / "m", front_policy(postfix.reinject_port)) as m:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = m.cli("status", "--json")
            if r.returncode == 0:
                break
            time.sleep(0.3)
        st = json.loads(r.stdout)
        assert st["running"] and st["pid"] == m.proc.pid and st["sessions"] == 0
        assert m.cli("reload").returncode == 0
        m.wait_log("reload: policy reloaded")
        # a broken file is refused by the command before any signal is sent
        m.config.write_text("[server\n")
        r = m.cli("reload")
        assert r.returncode == 2 and "TOML syntax error" in r.stderr
        m.write()
        m.signal(signal.SIGTERM)
        m.proc.wait(timeout=20)
        assert m.cli("status").returncode == 1


def test_report_and_doctor_cover_retention(tmp_path):
    """Deletions by a retention run appear in the report; doctor checks store and log."""
    store = tmp_path / "vmail"
    md = store / "hosted.example" / "alice" / "Maildir"
    for sub in ("cur", "new", "tmp", ".Trash/cur", ".Trash/new", ".Trash/tmp"):
        (md / sub).mkdir(parents=True)
    for i in range(3):
        (md / ".Trash" / "cur" / f"{1000 + i}.M1P1.host:2,S").write_bytes(
            b"Subject: x\r\n\r\n" + b"y" * 100
        )
    (md / "cur" / "2000.M1P1.host:2,S").write_bytes(b"Subject: keep\r\n\r\nkeep\r\n")
    dlog = tmp_path / "dovecot.log"
    dlog.write_text(
        "Nov 22 10:00:00 host dovecot: imap-login: Login: user=<bob@hosted.example>, "
        "method=PLAIN, rip=127.0.0.1\n"
    )
    policy = front_policy(9)
    policy["retention"] = {
        "store": {"layout": "maildir++", "path": str(store) + "/%d/%n/Maildir"},
        "access": {"dovecot_log": str(dlog)},
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
    m = Maild(tmp_path / "m", policy)
    m.write()
    time.sleep(1.2)  # the rule's age: the files must be in Trash for over a second
    r = m.cli("retention", "run", "trash-fast")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (md / ".Trash" / "cur").iterdir()) == []
    assert [p.name for p in (md / "cur").iterdir()] == ["2000.M1P1.host:2,S"]
    rep = json.loads(m.cli("report", "--since", "1h", "--json").stdout)
    assert rep["retention"]["deleted_messages"] == 3
    assert rep["retention"]["by_rule"]["trash-fast"]["bytes"] == 3 * 114
    assert "Retention:" in m.cli("report", "--since", "1h").stdout
    rc, lines = doctor_plain(m)
    assert lines["mail-store"] == ["OK"] and lines["access-log"] == ["OK"], lines
    dlog.write_text("nothing here\n")
    shutil.rmtree(store / "hosted.example")
    rc, lines = doctor_plain(m)
    assert lines["mail-store"] == ["WARN"] and lines["access-log"] == ["WARN"], lines


def doctor_plain(m: Maild) -> tuple[int, dict[str, list[str]]]:
    r = m.cli("doctor")
    lines: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        mm = re.match(r"^(OK|WARN|FAIL)\s+([\w-]+):", line)
        if mm:
            lines.setdefault(mm.group(2), []).append(mm.group(1))
    return r.returncode, lines
