"""The harness itself, against real Postfix, smtp-sink and swaks (no maild involved)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.harness import require_binary
from tests.harness.clients import raw_smtp, reply_codes, smtp_source, swaks
from tests.harness.postfix import Postfix, PostfixError
from tests.harness.sink import parse_dump

pytestmark = pytest.mark.integration


def uniq(prefix: str = "u") -> str:
    """A local part no other test uses, so module-shared instances stay independent."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def front(module_postfix_factory) -> Postfix:
    """One front-mode instance shared by the read-mostly tests of this module."""
    return module_postfix_factory()


def test_reinject_delivers_each_recipient_to_its_own_maildir(front: Postfix) -> None:
    a, b = uniq("alice"), uniq("Bob")
    res = swaks(
        front.reinject_port,
        frm="sender@outside.example",
        to=[f"{a}@hosted.example", f"{b}@Host.Hosted.Example"],
        header=["Subject: harness delivery"],
        body="first line\r\nsecond line\r\n",
    )
    assert res.ok, res.output
    assert res.banner_code == 220
    assert res.rcpt_codes == [250, 250]
    assert res.data_code == 250 and res.queue_id

    (msg_a,) = front.wait_for_messages(f"{a}@hosted.example", 1)
    (msg_b,) = front.wait_for_messages(f"{b}@host.hosted.example", 1)
    assert b"Subject: harness delivery" in msg_a
    assert b"first line\nsecond line" in msg_a
    assert f"Delivered-To: {a}@hosted.example".encode() in msg_a
    assert b"Return-Path: <sender@outside.example>" in msg_a
    # The headers keep the case as sent; the Maildir path is folded to lower case.
    assert f"Delivered-To: {b}@Host.Hosted.Example".encode() in msg_b
    assert front.maildir(f"{b}@host.hosted.example").name == b.lower()
    assert front.messages(f"{uniq('nobody')}@hosted.example") == []


def test_outside_domain_is_caught_never_relayed(front: Postfix) -> None:
    before = len(front.outside_messages())
    rcpt = f"{uniq('ext')}@outside.example"
    res = swaks(front.reinject_port, frm="someone@hosted.example", to=rcpt)
    assert res.ok, res.output

    msgs = front.wait_for_outside(before + 1)
    assert any(f"Delivered-To: {rcpt}".encode() in m for m in msgs)
    front.wait_for_log(rf"to=<{rcpt}>, relay=outside, .*status=sent")
    # No smtp(8) client ever ran: nothing tried to leave the machine.
    assert "postfix/smtp[" not in front.log()
    front.wait_queue_empty()
    assert front.queue_ids() == []


def test_count_all_counts_hosted_and_outside(front: Postfix) -> None:
    before = front.count_all()
    local = uniq("cnt")
    res = swaks(
        front.reinject_port,
        frm="a@hosted.example",
        to=[f"{local}@hosted.example", f"{local}@elsewhere.example"],
    )
    assert res.ok, res.output
    front.wait_for_messages(f"{local}@hosted.example", 1)
    front.wait_queue_empty()
    assert front.count_all() == before + 2
    assert front.all_messages()[f"{local}@hosted.example"]


def test_raw_smtp_sends_exact_bytes_and_sees_every_reply(front: Postfix) -> None:
    rcpt = f"{uniq('raw')}@hosted.example"
    lines = raw_smtp(
        front.reinject_port,
        [
            b"EHLO raw.test\r\n",
            b"MAIL FROM:<raw@outside.example>\r\n",
            f"RCPT TO:<{rcpt}>\r\n".encode(),
            b"DATA\r\n",
            b"Subject: raw\r\n\r\nline one\r\n..dot-stuffed\r\n",
            b".\r\n",
            b"QUIT\r\n",
        ],
    )
    assert lines[0].startswith("220 ")
    assert any(line.startswith("250-PIPELINING") for line in lines)
    assert reply_codes(lines) == [220, 250, 250, 250, 354, 250, 221]
    (msg,) = front.wait_for_messages(rcpt, 1)
    assert b"\nSubject: raw\n" in msg
    assert msg.endswith(b"\n\nline one\n.dot-stuffed\n")  # dot-unstuffed by Postfix


def test_raw_smtp_returns_when_server_stays_silent(front: Postfix) -> None:
    # Inside DATA nothing answers a chunk; the helper must move on and finish.
    lines = raw_smtp(
        front.reinject_port,
        [
            b"HELO x\r\n",
            b"MAIL FROM:<>\r\n",
            b"RCPT TO:<nobody@hosted.example>\r\n",
            b"DATA\r\n",
            b"no terminator yet\r\n",
        ],
        reply_wait=0.3,
    )
    assert reply_codes(lines) == [220, 250, 250, 250, 354]


def test_smtp_source_messages_arrive(front: Postfix) -> None:
    rcpt = f"{uniq('src')}@hosted.example"
    proc = smtp_source(front.reinject_port, sessions=2, messages=4, recipient=rcpt)
    assert proc.returncode == 0, proc.stderr
    assert len(front.wait_for_messages(rcpt, 4)) == 4


def test_two_instances_run_at_once_and_stay_separate(front: Postfix, postfix_factory) -> None:
    other = postfix_factory()
    assert {other.smtpd_port, other.reinject_port}.isdisjoint(
        {front.smtpd_port, front.reinject_port}
    )
    assert other.running and front.running
    local = uniq("two")
    for pf in (front, other):
        res = swaks(
            pf.reinject_port,
            frm="x@outside.example",
            to=f"{local}@hosted.example",
            header=[f"Subject: for {pf.reinject_port}"],
        )
        assert res.ok, res.output
    for pf in (front, other):
        (msg,) = pf.wait_for_messages(f"{local}@hosted.example", 1)
        assert f"Subject: for {pf.reinject_port}".encode() in msg


def test_public_smtpd_relay_rules_and_user_list(postfix_factory) -> None:
    pf = postfix_factory(
        main_cf={"mynetworks": "127.0.0.1/32"},
        users=["known@hosted.example"],
    )
    res = swaks(
        pf.smtpd_port,
        frm="x@outside.example",
        to=["known@hosted.example", "unknown@hosted.example", "ext@outside.example"],
        bind="127.0.0.5",  # not in mynetworks: no relaying
    )
    assert res.rcpt_codes[0] == 250
    assert res.rcpt_codes[1] == 550  # unknown user in a hosted domain
    assert res.rcpt_codes[2] in (454, 554)  # relay access denied
    assert res.data_code == 250
    pf.wait_for_messages("known@hosted.example", 1)
    pf.wait_queue_empty()
    assert pf.outside_messages() == []
    # The re-injection smtpd trusts 127/8 and skips recipient checks; virtual
    # delivery then bounces the unknown user back to the (outside) sender.
    res = swaks(pf.reinject_port, frm="x@outside.example", to="unknown@hosted.example")
    assert res.rcpt_codes == [250]
    (bounce,) = pf.wait_for_outside(1)
    assert b"unknown user: unknown@hosted.example" in bounce


def test_smtp_sink_receives_and_records_envelope(smtp_sink_factory) -> None:
    sink = smtp_sink_factory()
    res = swaks(
        sink.port,
        frm="a@outside.example",
        to=["r1@x.example", "r2@x.example"],
        helo="client.test",
        header=["Subject: to the sink"],
    )
    assert res.ok, res.output
    (msg,) = sink.wait_for_messages(1)
    assert msg.helo == "client.test"
    assert msg.mail_from.startswith("<a@outside.example>")
    assert msg.rcpt_to == ["<r1@x.example>", "<r2@x.example>"]
    assert b"Subject: to the sink" in msg.data
    assert msg.client_addr == "127.0.0.1"


def test_swaks_data_modes_and_pipelining(smtp_sink_factory) -> None:
    sink = smtp_sink_factory()
    massaged = swaks(
        sink.port,
        frm="a@outside.example",
        to="r@x.example",
        data="Subject: fixed up\n\n%FROM_ADDRESS%\n",
        header=["X-One: 1", "X-Two: 2"],
        pipeline=True,
    )
    assert massaged.ok, massaged.output
    assert massaged.rcpt_codes == [250] and massaged.data_code == 250
    exact = swaks(
        sink.port,
        frm="a@outside.example",
        to="r@x.example",
        data=b"Subject: exact\r\n\r\n%FROM_ADDRESS% \\n\r\n",
        raw_data=True,
    )
    assert exact.ok, exact.output
    first, second = sink.wait_for_messages(2)
    assert first.data.startswith(b"Subject: fixed up\nX-One: 1\nX-Two: 2\n\n")
    assert b"a@outside.example" in first.data  # swaks expanded the token
    assert second.data.startswith(b"Subject: exact\n\n%FROM_ADDRESS% \\n\n")


def test_smtp_sink_refuses_with_its_options(smtp_sink_factory) -> None:
    sink = smtp_sink_factory(extra_args=("-f", "RCPT"))
    res = swaks(sink.port, frm="a@outside.example", to="r@x.example")
    assert not res.ok
    assert res.rcpt_codes == [500], res.output
    assert sink.messages() == []


def test_outside_sink_relay_defer_then_flush(postfix_factory, smtp_sink_factory) -> None:
    refusing = smtp_sink_factory(extra_args=("-r", "RCPT"))
    pf = postfix_factory(outside_sink=refusing.port)
    res = swaks(pf.reinject_port, frm="x@hosted.example", to="far@outside.example")
    assert res.ok, res.output
    pf.wait_for_log(r"to=<far@outside\.example>, relay=127\.0\.0\.1.*status=deferred")
    (queued,) = pf.mailq()
    assert queued["recipients"][0]["address"] == "far@outside.example"
    assert "450" in queued["recipients"][0]["delay_reason"]
    assert pf.outside_messages() == []  # with outside_sink there is no catch-all

    port = refusing.port
    refusing.stop()
    accepting = smtp_sink_factory(port)
    pf.flush()
    (msg,) = accepting.wait_for_messages(1)
    assert msg.rcpt_to[0].startswith("<far@outside.example>")
    pf.wait_queue_empty()


def test_before_queue_proxy_filter_plumbing(postfix_factory, smtp_sink_factory) -> None:
    # smtp-sink stands in for maild: it sees what Postfix's public smtpd forwards
    # and its refusals go back to the client before Postfix queues anything.
    filt = smtp_sink_factory(extra_args=("-f", "RCPT"))
    pf = postfix_factory(proxy_filter=f"127.0.0.1:{filt.port}", proxy_timeout="20s")
    res = swaks(pf.smtpd_port, frm="x@outside.example", to="a@hosted.example")
    assert res.rcpt_codes == [500]
    assert pf.queue_ids() == [] and pf.count_all() == 0

    filt2 = smtp_sink_factory()
    pf2 = postfix_factory(proxy_filter=f"127.0.0.1:{filt2.port}", proxy_options="speed_adjust")
    assert "smtpd_proxy_options=speed_adjust" in (pf2.root / "etc/master.cf").read_text()
    res = swaks(pf2.smtpd_port, frm="x@outside.example", to="a@hosted.example")
    assert res.ok, res.output
    (msg,) = filt2.wait_for_messages(1)
    assert msg.rcpt_to == ["<a@hosted.example>"]


def test_failed_start_reports_log_and_stop_is_idempotent(tmp_path: Path, integration_env) -> None:
    pf = Postfix(tmp_path / "broken", main_cf={"mail_owner": "no-such-user-for-maild"})
    try:
        with pytest.raises(PostfixError) as exc:
            pf.start()
        assert "no-such-user-for-maild" in str(exc.value)
        assert not pf.running
        pf.stop()
        pf.stop()
    finally:
        pf.close()


def test_stop_twice_and_restart(tmp_path: Path, integration_env) -> None:
    with Postfix(tmp_path / "pf") as pf:
        assert pf.running
    assert not pf.running
    pf.stop()
    pf.start()
    try:
        res = swaks(pf.reinject_port, frm="x@outside.example", to="again@hosted.example")
        assert res.ok, res.output
        pf.wait_for_messages("again@hosted.example", 1)
    finally:
        pf.close()


def test_private_tmp_root_is_relocated_for_the_daemons(tmp_path: Path, integration_env) -> None:
    # tmp_path is 0700 and deep: Postfix (as postfix/nobody) could not reach it
    # and the postlog socket path would be too long, so the instance lives in
    # /tmp and the requested path links to it.
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    pf = Postfix(deep)
    try:
        assert deep.is_symlink() and deep.resolve() == pf.root
        assert len(str(pf.queue_dir / "public" / "postlog")) < 108
        pf.start()
        res = swaks(pf.reinject_port, frm="x@outside.example", to="deep@hosted.example")
        assert res.ok, res.output
        assert len(pf.wait_for_messages("deep@hosted.example", 1)) == 1
        assert (deep / "mail" / "hosted.example" / "deep" / "new").is_dir()
    finally:
        pf.close()
    assert not pf.root.exists() and not deep.exists()


def test_sasl_auth_via_dovecot(postfix_factory) -> None:
    require_binary("dovecot")
    pf = postfix_factory(
        sasl_users={"alice@hosted.example": "s3cret"},
        main_cf={"mynetworks": "127.0.0.1/32", "smtpd_sasl_authenticated_header": "yes"},
    )
    denied = swaks(
        pf.smtpd_port, frm="alice@hosted.example", to="far@outside.example", bind="127.0.0.5"
    )
    assert denied.rcpt_codes and denied.rcpt_codes[0] in (454, 554)
    bad = swaks(
        pf.smtpd_port,
        frm="alice@hosted.example",
        to="far@outside.example",
        bind="127.0.0.5",
        auth=("alice@hosted.example", "wrong"),
    )
    assert any(code == 535 for code, _ in bad.replies), bad.output
    res = swaks(
        pf.smtpd_port,
        frm="alice@hosted.example",
        to="far@outside.example",
        bind="127.0.0.5",
        auth=("alice@hosted.example", "s3cret"),
    )
    assert res.ok, res.output
    assert res.codes_for("AUTH") == [235]
    (msg,) = pf.wait_for_outside(1)
    assert b"(Authenticated sender: alice@hosted.example)" in msg


def test_parse_dump_splits_envelope_and_data() -> None:
    raw = (
        b"X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\nX-Helo-Args: h\n"
        b"X-Mail-Args: <a@b>\nX-Rcpt-Args: <c@d>\nX-Rcpt-Args: <e@f>\n"
        b"Received: from h ([127.0.0.1])\n\tby smtp-sink (smtp-sink) with ESMTP id 1;\n"
        b"\tSun, 22 Nov 2026 12:42:12 +0000 (UTC)\nSubject: s\n\nbody\n\n"
    )
    msg = parse_dump(raw)
    assert (msg.client_addr, msg.helo, msg.mail_from) == ("127.0.0.1", "h", "<a@b>")
    assert msg.rcpt_to == ["<c@d>", "<e@f>"]
    assert msg.data == b"Subject: s\n\nbody\n"
