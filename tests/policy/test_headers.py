"""Forged-header checks: the corpus (a passing and a failing message for every check),
the structure checks, actions, overrides, tag mode, [headers] parsing and check-message.

DNS is a real DNS server on loopback (tests/harness/dns.py), never the internet.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
from dataclasses import replace
from email.utils import format_datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from maild import dns as maild_dns
from maild.address import parse_path
from maild.antispam.limiter import Limiter, Rate, Reservation
from maild.cli import main
from maild.components import parse
from maild.config import ConfigError
from maild.policy import chain, pipeline, structure
from maild.policy import checks as h
from maild.policy.context import Client, Context, Message, Stage
from maild.policy.customer import resolve
from maild.policy.headers_cli import _run
from maild.policy.services import Services
from maild.policy.verdict import Action
from tests.harness.dns import STANDARD_DROP, STANDARD_SERVFAIL, STANDARD_ZONE, DnsServer
from tests.harness.maild import render

services = Services()  # the contexts' services (the limiter fixture adds a limiter)

CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "headers"
CASES = tomllib.loads((CORPUS / "cases.toml").read_text())["case"]
GRANTOR = "R. Roe, trusted-partner.example, ticket 4711"


def policy(nameserver: str, **headers: object) -> dict:
    return {
        "server": {"mode": "front", "hostname": "mx.hosted.example"},
        "postmaster": {"domains": ["hosted.example"], "hostnames": ["host.hosted.example"]},
        "customers": [
            {
                "name": "acme",
                "networks": ["192.0.2.0/24"],
                "logins": ["alice"],
                "domains": ["acme.example"],
                "addresses": ["news@partner.example"],
                "permitted": [
                    {
                        "domain": "trusted-partner.example",
                        "granted_by": GRANTOR,
                        "fields": ["from", "reply-to"],
                    }
                ],
            },
            {
                "name": "forwarder",
                "networks": ["198.51.100.0/24"],
                "domains": ["fwd.example"],
                "headers": {"checks": {"from-owner": "tag"}},
            },
        ],
        "dns": {"nameservers": [nameserver], "timeout": "2s"},
        "headers": headers,
    }


@pytest.fixture(scope="module")
def dns_server():
    """The loopback server, and maild.dns pointed at it for every test of the module
    (a test that parses its own policy must not depend on one that ran before it)."""
    with DnsServer(STANDARD_ZONE, servfail=STANDARD_SERVFAIL, drop=STANDARD_DROP) as s:
        maild_dns.configure(parse(policy(s.nameserver)))
        yield s
        maild_dns.configure(None)


@pytest.fixture
def config(dns_server):
    """The policy, with maild.dns pointed at the loopback server (as the daemon does)."""
    c = parse(policy(dns_server.nameserver))
    maild_dns.configure(c)
    return c


@pytest.fixture(scope="module")
def config_all(dns_server):
    return parse(policy(dns_server.nameserver, apply_to="all"))


@pytest.fixture
def limiter():
    lim = Limiter()
    services.limiter = lim
    yield lim
    services.limiter = None


_NOW = re.compile(r"\{now(?:([+-]\d+)([hd])|(-0000))?\}")


def load(name: str) -> bytes:
    """A corpus message with its {now...} dates filled in, with CRLF line ends."""

    def date(m: re.Match) -> str:
        if m.group(3):
            return time.strftime("%a, %d %b %Y %H:%M:%S -0000", time.gmtime())
        shift = int(m.group(1)) * (3600 if m.group(2) == "h" else 86400) if m.group(1) else 0
        return format_datetime_local(time.time() + shift)

    raw = (CORPUS / name).read_bytes()
    text = _NOW.sub(lambda m: date(m), raw.decode("utf-8", "surrogateescape"))
    return text.encode("utf-8", "surrogateescape").replace(b"\n", b"\r\n")


def format_datetime_local(ts: float) -> str:
    from datetime import datetime

    return format_datetime(datetime.fromtimestamp(ts).astimezone())


async def run_case(case: dict, config, config_all) -> dict:
    conf = config_all if case.get("apply_to_all") else config
    customer = case.get("customer", "acme")
    return await _run(
        conf,
        load(case["file"]),
        customer=(customer or None) if not case.get("login") else None,
        login=case.get("login", ""),
        client_addr=case.get("client", "192.0.2.7"),
        helo=case.get("helo", "mail.acme.example"),
        mail_from=case.get("mail_from", "boss@acme.example"),
        smtputf8=case.get("smtputf8", False),
        services=services,
    )


def _charge(limiter: Limiter, customer: str, n: int) -> None:
    res = Reservation()
    for _ in range(n):
        limiter.reserve(res, f"null-sender:{customer}", Rate.parse("30/1h"))
    limiter.commit(res)


# --------------------------------------------------------------------------- the corpus


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c['file']}" for i, c in enumerate(CASES)])
async def test_corpus(case, config, config_all, limiter):
    if case.get("prior_null_senders"):
        _charge(limiter, case.get("customer", "acme"), case["prior_null_senders"])
    report = await run_case(case, config, config_all)
    failed = sorted(r["name"] for r in report["checks"] if r["result"] == "fail")
    assert failed == sorted(case["fail"]), (case, report["checks"])
    v = report["verdict"]
    if "verdict" in case:
        want = case["verdict"]
        got = "relay" if v["action"] == "relay" else v["reply"]
        assert got.startswith(want), (want, v)
    elif case["fail"]:
        assert v["action"] != "relay" and v["rule"] in case["fail"], v
    else:
        assert v["action"] == "relay", v


async def test_corpus_has_a_passing_and_a_failing_message_for_every_check(
    config, config_all, limiter
):
    passed: set[str] = set()
    failed: set[str] = set()
    for case in CASES:
        if case.get("prior_null_senders"):
            limiter.counters.clear()
            _charge(limiter, "acme", case["prior_null_senders"])
        report = await run_case(case, config, config_all)
        limiter.counters.clear()
        for r in report["checks"]:
            (failed if r["result"] == "fail" else passed if r["result"] == "pass" else set()).add(
                r["name"]
            )
    assert set(chain.CHECKS) - failed == set(), "checks without a failing corpus message"
    assert set(chain.CHECKS) - passed == set(), "checks without a passing corpus message"
    assert len(chain.CHECKS) >= 24


# --------------------------------------------------------------------------- rules in the pipeline


def make_ctx(
    config,
    content: bytes,
    *,
    sender="<boss@acme.example>",
    addr="192.0.2.7",
    helo="mail.acme.example",
    login="",
    trusted=False,
) -> Context:
    client = Client(addr=addr, helo=helo, trusted_peer=trusted)
    s = parse_path(sender)
    ctx = Context(config=config, session_id="T1", client=client, sender=s, services=services)
    ctx.identity = resolve(config, client, login, s)
    ctx.message = Message(content)
    return ctx


async def test_forged_from_is_refused_with_its_rule_and_a_strike(config):
    ctx = make_ctx(config, load("forged-from.eml"))
    assert (await pipeline.run(Stage.MAIL, ctx)).accepted
    v = await pipeline.run(Stage.DATA, ctx)
    assert (v.action, v.code, v.status, v.rule, v.strike) == (
        Action.REJECT,
        550,
        "5.7.1",
        "from-owner",
        True,
    )
    assert "<ceo@bank.example>" in v.reason and "acme.example" in v.reason
    assert len(v.reply) < 512 and "\r" not in v.reply and "\n" not in v.reply


async def test_tag_mode_adds_verdict_headers_and_accepts(dns_server):
    conf = parse(policy(dns_server.nameserver, mode="tag"))
    ctx = make_ctx(
        conf,
        load("display-name-address.eml").replace(
            b"Subject: Quarterly", b"Reply-To: x@bank.example\r\nSubject: Quarterly"
        ),
        helo="vm",
    )
    assert (await pipeline.run(Stage.MAIL, ctx)).accepted
    v = await pipeline.run(Stage.DATA, ctx)
    assert v.accepted
    tags = [value for name, value in ctx.add_headers if name == "X-Maild-Verdict"]
    rules = [t.split()[0] for t in tags]
    assert rules == ["rule=helo-invalid", "rule=reply-to-owner", "rule=display-name-spoof"]
    assert all("result=fail enforce=reject;" in t for t in tags)


async def test_customer_mode_overrides_the_global_mode(dns_server):
    doc = policy(dns_server.nameserver, mode="tag")
    doc["customers"][0]["headers"] = {"mode": "enforce"}
    conf = parse(doc)
    ctx = make_ctx(conf, load("forged-from.eml"))
    assert (await pipeline.run(Stage.DATA, ctx)).rule == "from-owner"
    # ... and the forwarder, still in global tag mode with its own from-owner = "tag":
    ctx = make_ctx(
        conf,
        load("forged-from.eml"),
        sender="<srs@fwd.example>",
        addr="198.51.100.7",
        helo="relay.fwd.example",
    )
    assert (await pipeline.run(Stage.DATA, ctx)).accepted
    assert [n for n, _ in ctx.add_headers] == ["X-Maild-Verdict"]


async def test_global_check_actions_off_and_tempfail(dns_server):
    conf = parse(
        policy(dns_server.nameserver, checks={"from-owner": "tempfail", "helo-invalid": "off"})
    )
    ctx = make_ctx(conf, load("forged-from.eml"), helo="vm")
    assert (await pipeline.run(Stage.MAIL, ctx)).accepted  # helo-invalid is off
    v = await pipeline.run(Stage.DATA, ctx)
    assert (v.action, v.code, v.status, v.rule, v.strike) == (
        Action.TEMPFAIL,
        451,
        "4.7.1",
        "from-owner",
        False,
    )


async def test_mail_stage_checks_rerun_at_data_when_the_login_arrives_late(config):
    """Before-queue mode: at MAIL the client is a stranger; the login is in Postfix's
    Received line at end of data. The envelope is judged then, under the customer."""
    ctx = make_ctx(
        config,
        load("legit.eml"),
        sender="<boss@bank.example>",
        addr="203.0.113.77",
        helo="DESKTOP-7QX",
        trusted=True,
    )
    assert ctx.identity.customer is None
    assert (await pipeline.run(Stage.MAIL, ctx)).accepted
    ctx.identity = resolve(config, ctx.client, "alice", ctx.sender)
    v = await pipeline.run(Stage.DATA, ctx)
    assert (v.rule, v.code, v.status) == ("envelope-owner", 553, "5.7.1")


async def test_a_check_is_judged_once_per_transaction(config):
    ctx = make_ctx(config, load("legit.eml"), helo="vm")
    conf_tag = replace(
        config,
        sections={**config.sections, "headers": replace(config.sections["headers"], mode="tag")},
    )
    ctx.config = conf_tag
    await pipeline.run(Stage.MAIL, ctx)
    await pipeline.run(Stage.DATA, ctx)
    assert [v.split()[0] for n, v in ctx.add_headers] == ["rule=helo-invalid"]


async def test_postmaster_only_transactions_skip_every_check(config):
    ctx = make_ctx(config, load("forged-from.eml"))
    ctx.postmaster_only = True
    v = await pipeline.run(Stage.DATA, ctx)
    assert v.accepted and v.rule == "postmaster"


async def test_unidentified_senders_are_not_checked_by_default(config):
    ctx = make_ctx(
        config,
        load("from-missing.eml"),
        sender="<x@outside.example>",
        addr="203.0.113.5",
        helo="vm",
    )
    assert ctx.identity.customer is None
    assert (await pipeline.run(Stage.MAIL, ctx)).accepted
    assert (await pipeline.run(Stage.DATA, ctx)).accepted
    assert ctx.add_headers == []


async def test_a_domain_attribution_is_not_a_submission(config):
    """MAIL FROM at acme.example from a stranger's address attributes, not authorises:
    acme's own checks must not judge (or relax) it."""
    ctx = make_ctx(config, load("forged-from.eml"), addr="203.0.113.5", helo="vm")
    assert ctx.identity.name == "acme" and ctx.identity.by == "domain"
    assert (await pipeline.run(Stage.DATA, ctx)).accepted


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    "value, host",
    [
        (
            "from a.example (a [192.0.2.1]) by mx.hosted.example (maild) with ESMTP id X; date",
            "mx.hosted.example",
        ),
        (
            "from a (comment with by evil.example) by MX.Hosted.Example. with SMTP; d",
            "mx.hosted.example",
        ),
        ("from a.example\r\n\tby\r\n\tmx.acme.example; Mon, 3 Jun 2024", "mx.acme.example"),
        ("from a.example with local; Mon, 3 Jun 2024", ""),
    ],
)
def test_received_by(value, host):
    assert structure.received_by(value) == host


def test_received_forged_skips_only_the_trusted_upstreams_own_line(config):
    ours = (
        "Received: from c.example (c.example [192.0.2.7])\r\n\tby host.hosted.example "
        "(Postfix) with ESMTPSA id 4V;\r\n\tMon, 3 Jun 2024 14:05:00 +0200\r\n"
    )
    msg = load("legit.eml")
    ctx = make_ctx(config, (ours + "").encode() + msg, trusted=True)
    assert structure.received_forged(ctx) is None
    ctx = make_ctx(config, ours.encode() + msg, trusted=False)
    assert structure.received_forged(ctx) is not None  # from a client, the same line is forged
    forged = load("received-forged.eml")
    ctx = make_ctx(config, ours.encode() + forged, trusted=True)
    assert "mx.hosted.example" in structure.received_forged(ctx).reason


def test_localhost_is_never_one_of_our_names(config):
    conf = replace(config, server=replace(config.server, hostname="localhost"))
    ctx = make_ctx(
        conf, b"Received: from localhost by localhost; d\r\nFrom: a@acme.example\r\n\r\n"
    )
    assert "localhost" not in h.own_names(ctx)
    assert structure.received_forged(ctx) is None


def test_message_mailboxes_are_parsed_once_and_shared():
    m = Message(
        b"From: =?utf-8?q?J=C3=B6rg?= <j@acme.example>\r\nReply-To: a@b.example, "
        b"c@d.example\r\nSender: broken <x@\r\n\r\nbody\r\n"
    )
    assert m.mailboxes["from"] == (("Jörg", "j@acme.example", "acme.example"),)
    assert [a for _, a, _ in m.mailboxes["reply-to"]] == ["a@b.example", "c@d.example"]
    assert m.mailboxes["sender"] is None
    assert m.mailboxes is m.mailboxes and m.field_counts == {"from": 1, "reply-to": 1, "sender": 1}


# --------------------------------------------------------------------------- [headers]


def test_defaults_when_the_section_is_absent():
    conf = parse({"postmaster": {"domains": ["hosted.example"]}})
    s = conf.sections["headers"]
    assert (s.mode, s.apply_to, s.checks, s.date_future, s.date_past) == (
        "enforce",
        "customers",
        {},
        7200.0,
        7 * 86400.0,
    )
    assert chain.CHECKS["from-owner"].default == "reject"
    assert chain.CHECKS["date-past"].default == "tag"
    assert chain.CHECKS["null-sender-rate"].default == "tempfail"


def test_the_shipped_policy_parses_with_the_documented_defaults():
    from maild.components import load as load_config

    conf = load_config(Path(__file__).resolve().parents[2] / "policies.toml")
    s = conf.sections["headers"]
    assert s.mode == "enforce" and s.null_sender_rate.text == "30/1h"
    assert conf.sections["dns"].timeout == 5.0


@pytest.mark.parametrize(
    "headers, customer, needle",
    [
        ({"mode": "loud"}, {}, 'headers.mode = "loud": expected one of "enforce", "tag"'),
        ({"apply_to": "everyone"}, {}, 'headers.apply_to = "everyone": expected one of'),
        (
            {"checks": {"from-ownr": "tag"}},
            {},
            "headers.checks.from-ownr: unknown check; known checks:",
        ),
        (
            {"checks": {"from-owner": "drop"}},
            {},
            'headers.checks.from-owner = "drop": expected one of "reject"',
        ),
        ({"null_sender_rate": "lots"}, {}, 'headers.null_sender_rate = "lots": expected a rate'),
        ({"date_future": "soon"}, {}, 'headers.date_future = "soon": expected a duration'),
        ({"colour": "red"}, {}, "headers.colour: unknown key"),
        ({}, {"headers": {"mode": "gentle"}}, 'customers[0].headers.mode = "gentle"'),
        (
            {},
            {"headers": {"checks": {"helo": "off"}}},
            "customers[0].headers.checks.helo: unknown check",
        ),
        (
            {},
            {"permitted": [{"domain": "p.example"}]},
            "customers[0].permitted[0].granted_by is missing: say who granted the permission",
        ),
        (
            {},
            {"permitted": [{"address": "a@p.example", "domain": "p.example", "granted_by": "x"}]},
            "customers[0].permitted[0]: give exactly one of address",
        ),
        (
            {},
            {"permitted": [{"address": "nobody", "granted_by": "x"}]},
            'customers[0].permitted[0].address = "nobody": expected a full address',
        ),
        (
            {},
            {"permitted": [{"domain": "p.example", "granted_by": "x", "fields": ["bcc"]}]},
            'customers[0].permitted[0].fields[0] = "bcc": expected one of "envelope"',
        ),
    ],
)
def test_bad_settings_name_the_key_the_value_and_the_fix(headers, customer, needle):
    doc = {
        "postmaster": {"domains": ["hosted.example"]},
        "headers": headers,
        "customers": [{"name": "c", "domains": ["c.example"], **customer}],
    }
    with pytest.raises(ConfigError) as e:
        parse(doc)
    assert any(needle in p for p in e.value.problems), e.value.problems


def test_permitted_entries_keep_who_granted_them(config):
    from maild.policy.identity import owner_of

    acme = config.customer("acme")
    assert owner_of(acme, "claims@trusted-partner.example", "from") == f"permitted by {GRANTOR}"
    assert owner_of(acme, "claims@sub.trusted-partner.example", "reply-to") is not None
    assert owner_of(acme, "claims@trusted-partner.example", "envelope") is None
    assert owner_of(acme, "claims@trusted-partner.example.evil.example", "from") is None
    assert owner_of(acme, "x@notacme.example", "from") is None
    assert owner_of(acme, "News+june@Partner.Example", "from") == "address news@partner.example"


# --------------------------------------------------------------------------- check-message


@pytest.fixture
def policy_file(tmp_path, dns_server):
    p = tmp_path / "policies.toml"
    doc = policy(dns_server.nameserver)
    permitted = doc["customers"][0].pop("permitted")
    extra = "".join(
        f'\n[[customers.permitted]]\ndomain = "{x["domain"]}"\ngranted_by = "{x["granted_by"]}"\n'
        for x in permitted
    )
    # acme must be the last [[customers]] entry for [[customers.permitted]] to attach to it
    doc["customers"].reverse()
    p.write_text(render(doc) + extra)
    return p


def cli(policy_file, *args: str):
    return CliRunner().invoke(main, ["check-message", *args, "-c", str(policy_file)])


def test_check_message_prints_every_verdict_and_exits_1_when_refused(policy_file, tmp_path):
    msg = tmp_path / "m.eml"
    msg.write_bytes(load("forged-from.eml").replace(b"\r\n", b"\n"))
    r = cli(
        policy_file,
        str(msg),
        "--customer",
        "acme",
        "--helo",
        "mail.acme.example",
        "--mail-from",
        "boss@acme.example",
    )
    assert r.exit_code == 1, r.output
    lines = r.output.splitlines()
    assert "customer=acme (by network)" in lines[0]
    assert sum(1 for x in lines if x.startswith("  ")) == len(chain.CHECKS)
    assert any(
        re.match(r"  FAIL  from-owner\s+reject: 550 5.7.1 From: address <ceo@bank.example>", x)
        for x in lines
    ), r.output
    assert re.search(r"  pass  envelope-owner", r.output)
    assert lines[-1].startswith("verdict: reject by from-owner: 550 5.7.1")


def test_check_message_without_helo_skips_the_helo_checks_and_shows_the_real_verdict(
    policy_file, tmp_path
):
    msg = tmp_path / "m.eml"
    msg.write_bytes(load("forged-from.eml"))
    r = cli(
        policy_file, str(msg), "--customer", "acme", "--mail-from", "boss@acme.example", "--json"
    )
    assert r.exit_code == 1, r.output
    data = json.loads(r.output)
    rows = {c["name"]: c for c in data["checks"]}
    assert rows["helo-invalid"] == {
        "name": "helo-invalid",
        "stage": "MAIL",
        "result": "skip",
        "why": "no --helo given",
    }
    assert rows["helo-ours"]["result"] == "skip"
    assert data["verdict"]["rule"] == "from-owner"
    # an empty --helo is a client that greeted with nothing: judged, and refused
    r = cli(
        policy_file,
        str(msg),
        "--customer",
        "acme",
        "--mail-from",
        "boss@acme.example",
        "--helo",
        "",
        "--json",
    )
    assert json.loads(r.output)["verdict"]["rule"] == "helo-invalid"


def test_check_message_json_and_a_clean_message(policy_file, tmp_path):
    msg = tmp_path / "ok.eml"
    msg.write_bytes(load("legit-permitted.eml"))
    r = cli(
        policy_file,
        str(msg),
        "--client",
        "192.0.2.7",
        "--helo",
        "mail.acme.example",
        "--mail-from",
        "<boss@acme.example>",
        "--json",
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["verdict"] == {"action": "relay", "rule": "-", "reply": ""}
    assert data["customer"] == "acme (by network)"
    assert {c["result"] for c in data["checks"]} == {"pass"}


def test_check_message_without_a_customer_skips_the_customer_checks(policy_file, tmp_path):
    msg = tmp_path / "m.eml"
    msg.write_bytes(load("forged-from.eml"))
    r = cli(policy_file, str(msg), "--json")
    data = json.loads(r.output)
    assert r.exit_code == 0
    skipped = {c["name"] for c in data["checks"] if c["result"] == "skip"}
    assert skipped == set(chain.CHECKS)
    assert data["customer"] == "- (not identified)"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--customer", "nobody"], "no customer 'nobody'"),
        (["--client", "not-an-ip"], "'not-an-ip' is not an IP address"),
        (["--mail-from", "<a@b"], "--mail-from"),
    ],
)
def test_check_message_usage_errors_exit_2_without_a_traceback(policy_file, tmp_path, args, needle):
    msg = tmp_path / "m.eml"
    msg.write_bytes(load("legit.eml"))
    r = cli(policy_file, str(msg), *args)
    assert r.exit_code == 2 and needle in r.output, r.output
    assert "Traceback" not in r.output


def test_check_message_missing_or_empty_file(policy_file, tmp_path):
    r = cli(policy_file, str(tmp_path / "absent.eml"))
    assert r.exit_code == 2 and "absent.eml" in r.output and "Traceback" not in r.output
    (tmp_path / "empty.eml").write_bytes(b"\n\n")
    r = cli(policy_file, str(tmp_path / "empty.eml"))
    assert r.exit_code == 2 and "the file is empty" in r.output


def test_check_message_reads_the_envelope_sender_from_return_path(policy_file, tmp_path):
    msg = tmp_path / "m.eml"
    msg.write_bytes(load("forged-return-path.eml"))
    r = cli(policy_file, str(msg), "--customer", "acme", "--helo", "mail.acme.example", "--json")
    data = json.loads(r.output)
    assert data["mail_from"] == "<bounces@bank.example>"
    assert data["verdict"]["rule"] == "envelope-owner"


def test_only_forgery_counts_as_a_strike():
    """Malformed headers are refused but are no offence; forged ones are strikes."""
    from maild.policy.chain import CHECKS

    FORGERY = {name for name, c in CHECKS.items() if c.strike}
    assert {"from-owner", "display-name-spoof", "envelope-owner"} <= FORGERY
    assert "date-missing" not in FORGERY and "helo-invalid" not in FORGERY
    assert set(CHECKS) >= FORGERY
