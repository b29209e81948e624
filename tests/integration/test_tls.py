"""Front mode's TLS against real clients: swaks, openssl s_client, Postfix's smtp client.

maild listens with STARTTLS on [server] listen, implicit TLS ([server.tls] implicit) and
a submission listener that requires STARTTLS; the certificate is made here with openssl.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess

import pytest

from tests.harness import require_binary
from tests.harness.certs import make_cert
from tests.harness.clients import swaks
from tests.harness.maild import Maild
from tests.harness.ports import free_port
from tests.harness.postfix import Postfix
from tests.harness.waits import wait_until
from tests.integration.conftest import CUSTOMER_IP, STRANGER, front_policy, need
from tests.integration.wire import client_context, reply, session, starttls


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = make_cert(d / "live")
    return d, cert, key


@pytest.fixture(scope="module")
def tls_maild(postfix, certs, tmp_path_factory):
    _, cert, key = certs
    implicit, submission = free_port(), free_port()
    policy = front_policy(postfix.reinject_port)
    policy["server"]["tls"] = {
        "certificate": str(cert),
        "key": str(key),
        "implicit": [f"127.0.0.1:{implicit}"],
        "submission": [f"127.0.0.1:{submission}"],
        "customers": "encrypt",
    }
    m = Maild(tmp_path_factory.mktemp("maild-tls"), policy)
    m.start()
    m.implicit, m.submission = implicit, submission
    yield m
    m.stop()


def peer_cn(port: int) -> str:
    t, _, _ = starttls(port)
    der = t.getpeercert(binary_form=True)
    t.close()
    pem = ssl.DER_cert_to_PEM_cert(der)
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-subject"], input=pem, capture_output=True, text=True
    )
    return out.stdout.strip()


def test_swaks_starttls_delivers_and_received_names_the_tls_protocol_and_cipher(postfix, tls_maild):
    r = swaks(
        tls_maild.port,
        frm="someone@outside.example",
        to="tls-user@hosted.example",
        bind=STRANGER,
        extra=["-tls"],
        header=["Subject: over tls"],
    )
    assert r.ok, r.output
    assert "TLS started" in r.output
    msgs = wait_until(lambda: postfix.messages("tls-user@hosted.example"), timeout=30)
    assert msgs, postfix.log()
    head = msgs[0].split(b"\n\n", 1)[0].decode()
    maild_line = next(part for part in head.split("\nReceived: ") if "(maild) with" in part)
    assert "(using TLSv1.3 with cipher TLS_" in maild_line, head
    assert "bits))" in maild_line
    assert "with ESMTPS id" in maild_line, head


def test_openssl_refuses_tls_1_0_and_1_1_and_offers_1_2_without_compression(tls_maild):
    openssl = require_binary("openssl")

    def s_client(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                openssl,
                "s_client",
                "-connect",
                f"127.0.0.1:{tls_maild.port}",
                "-starttls",
                "smtp",
                *flags,
            ],
            input="QUIT\n",
            capture_output=True,
            text=True,
            timeout=60,
        )

    # the client's own floor lowered, so a refusal is maild's, not openssl's
    for old in ("-tls1", "-tls1_1"):
        r = s_client(old, "-cipher", "DEFAULT@SECLEVEL=0")
        assert "Cipher is (NONE)" in r.stdout, r.stdout
    r = s_client("-tls1_2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "New, TLSv1.2, Cipher is ECDHE-" in r.stdout, r.stdout
    assert "Compression: NONE" in r.stdout
    for weak in ("RC4", "DES-CBC3", "NULL", "EXPORT", "aNULL"):
        r = s_client("-tls1_2", "-cipher", weak + "@SECLEVEL=0")
        assert "Cipher is (NONE)" in r.stdout or r.returncode != 0, (weak, r.stdout)


def test_implicit_tls_listener_takes_swaks_tls_on_connect(postfix, tls_maild):
    r = swaks(
        tls_maild.implicit,
        frm="someone@outside.example",
        to="implicit@hosted.example",
        bind=STRANGER,
        extra=["--tls-on-connect"],
    )
    assert r.ok, r.output
    msgs = wait_until(lambda: postfix.messages("implicit@hosted.example"), timeout=30)
    assert msgs and b"with ESMTPS id" in msgs[0]


def test_a_failed_handshake_on_the_implicit_listener_is_one_log_line(tls_maild):
    openssl = require_binary("openssl")
    r = subprocess.run(
        [
            openssl,
            "s_client",
            "-connect",
            f"127.0.0.1:{tls_maild.implicit}",
            "-tls1_1",
            "-cipher",
            "DEFAULT@SECLEVEL=0",
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Cipher is (NONE)" in r.stdout, r.stdout
    assert wait_until(
        lambda: (
            "TLS handshake failed: client=unknown[127.0.0.1]: UNSUPPORTED_PROTOCOL"
            in tls_maild.log()
        )
    ), tls_maild.log()


def test_submission_listener_requires_starttls_before_mail(tls_maild):
    s, f = session(tls_maild.submission)
    with s:
        s.sendall(b"EHLO client.example\r\n")
        ehlo = reply(f)
        assert b"STARTTLS" in ehlo and b"AUTH" not in ehlo
        s.sendall(b"MAIL FROM:<a@outside.example>\r\n")
        assert reply(f).startswith(b"530 5.7.0 Must issue a STARTTLS command first")


def test_a_customer_must_use_tls_before_mail_a_stranger_need_not(tls_maild):
    for source, expect in ((CUSTOMER_IP, b"530 5.7.0 "), (STRANGER, b"250 ")):
        s, f = session(tls_maild.port, source)
        with s:
            s.sendall(b"EHLO client.example\r\nMAIL FROM:<a@acme.example>\r\n")
            reply(f)
            assert reply(f).startswith(expect), source
    t, tf, _ = starttls(tls_maild.port, source=CUSTOMER_IP)
    t.sendall(b"MAIL FROM:<a@acme.example>\r\n")
    assert reply(tf).startswith(b"250 ")
    t.close()
    line = wait_until(
        lambda: next((x for x in tls_maild.log().splitlines() if "rule=tls" in x), None)
    )
    assert line and f"[{CUSTOMER_IP}]" in line and "530 5.7.0" in line, tls_maild.log()
    assert "customer=acme" in line and "from=<a@acme.example>" in line, line


def test_a_command_pipelined_after_starttls_in_clear_is_not_run_inside_tls(tls_maild):
    """The STARTTLS plaintext injection (CVE-2011-0411 class): the MAIL sent in the same
    packet as STARTTLS must be discarded, not answered inside the TLS session."""
    s, f = session(tls_maild.port)
    s.sendall(b"EHLO client.example\r\n")
    reply(f)
    s.sendall(b"STARTTLS\r\nMAIL FROM:<injected@outside.example>\r\n")
    assert reply(f).startswith(b"220 ")
    t = client_context().wrap_socket(s, server_hostname="mx.hosted.example")
    tf = t.makefile("rb")
    t.sendall(b"NOOP\r\n")
    assert reply(tf).startswith(b"250 "), "an injected reply came first"
    t.sendall(b"EHLO client.example\r\nRCPT TO:<x@hosted.example>\r\n")
    reply(tf)
    assert reply(tf).startswith(b"503 5.5.1 Error: need MAIL command")
    t.close()


def test_maild_status_shows_the_certificate_and_the_tls_listeners(tls_maild, certs):
    _, cert, _ = certs

    def status() -> str:
        r = tls_maild.cli("status")
        return r.stdout if r.returncode == 0 and "tls:" in r.stdout else ""

    out = wait_until(status, timeout=20)
    assert out, tls_maild.cli("status")
    assert f"tls: {cert} (subject " in out and "TLSv1.2 or later" in out, out
    assert f"implicit listeners: 127.0.0.1:{tls_maild.implicit}" in out
    assert f"submission listeners: 127.0.0.1:{tls_maild.submission}" in out


def test_sighup_loads_a_new_certificate_and_keeps_tls_sessions_in_flight(tls_maild, certs):
    d, cert, key = certs
    before = peer_cn(tls_maild.port)
    assert "mx.hosted.example" in before
    held, held_f, _ = starttls(tls_maild.port)
    new_cert, new_key = make_cert(d / "renewed", cn="renewed.hosted.example")
    shutil.copy(new_cert, cert)
    shutil.copy(new_key, key)
    reloads = tls_maild.log().count("reload: policy reloaded")
    tls_maild.signal(signal.SIGHUP)
    assert wait_until(lambda: tls_maild.log().count("reload: policy reloaded") > reloads)
    assert "renewed.hosted.example" in peer_cn(tls_maild.port)
    held.sendall(b"NOOP\r\n")
    assert reply(held_f).startswith(b"250 ")
    held.close()


def test_check_config_names_an_unreadable_certificate_and_a_key_that_does_not_match(
    tmp_path, certs
):
    _, cert, key = certs
    other_cert, other_key = make_cert(tmp_path / "other", cn="other.example")
    m = Maild(tmp_path / "m", {"server": {"mode": "front"}})
    m.policy["server"]["tls"] = {"certificate": str(tmp_path / "missing.pem"), "key": str(key)}
    m.write()
    r = m.cli("check-config")
    assert r.returncode == 2
    assert f"certificate = '{tmp_path / 'missing.pem'}': cannot read it" in r.stderr
    m.policy["server"]["tls"] = {"certificate": str(cert), "key": str(other_key)}
    m.write()
    r = m.cli("check-config")
    assert r.returncode == 2
    assert f"key = '{other_key}': does not match the certificate '{cert}'" in r.stderr
    m.policy["server"]["tls"] = {"certificate": str(other_cert), "key": str(other_key)}
    m.write()
    assert m.cli("check-config").returncode == 0


def test_postfix_smtp_client_relays_through_maild_with_tls_encrypt(postfix, tls_maild, tmp_path):
    """A Postfix (the customer's MTA) whose smtp client must encrypt, relaying via maild."""
    need("postfix")
    sender = Postfix(
        tmp_path / "pf-sender",
        hosted_domains=["sender.example"],
        hostname="mta.acme.example",
        main_cf={
            "relayhost": f"[127.0.0.1]:{tls_maild.port}",
            "smtp_tls_security_level": "encrypt",
            "smtp_bind_address": CUSTOMER_IP,
            "smtp_tls_loglevel": "1",
        },
        outside_sink=f"smtp:[127.0.0.1]:{tls_maild.port}",
    )
    sender.start()
    try:
        r = swaks(sender.smtpd_port, frm="app@acme.example", to="via-postfix@hosted.example")
        assert r.ok, r.output
        msgs = wait_until(lambda: postfix.messages("via-postfix@hosted.example"), timeout=60)
        assert msgs, sender.log() if hasattr(sender, "log") else ""
        assert b"with ESMTPS id" in msgs[0]
        assert b"(using TLSv1.3 with cipher" in msgs[0]
    finally:
        sender.stop()


def test_a_changed_tls_listener_list_is_named_as_needing_a_restart(tls_maild):
    implicit = tls_maild.policy["server"]["tls"]["implicit"]
    tls_maild.policy["server"]["tls"]["implicit"] = [f"127.0.0.1:{free_port()}"]
    tls_maild.write()
    try:
        r = tls_maild.cli("reload")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "[server] tls.implicit = 127.0.0.1:" in r.stderr
        assert "TLS listeners are bound once, at start" in r.stderr
    finally:
        tls_maild.policy["server"]["tls"]["implicit"] = implicit
        tls_maild.write()
        assert tls_maild.cli("reload").returncode == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_tls_port_taken_by_another_process_is_named_at_start(certs, tmp_path, workers):
    _, cert, key = certs
    holder = socket.create_server(("127.0.0.1", 0))
    taken = holder.getsockname()[1]
    policy = front_policy(9, workers=workers, listen=f"127.0.0.1:{free_port()}")
    policy["server"]["tls"] = {
        "certificate": str(cert),
        "key": str(key),
        "implicit": [f"127.0.0.1:{taken}"],
    }
    m = Maild(tmp_path / "m", policy)
    m.write()
    with holder:
        r = subprocess.run(
            [*m.cli_argv("serve"), "--log", "stderr", "--allow-root"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 1, r.stdout + r.stderr
    assert (
        f"cannot listen on 127.0.0.1:{taken} ([server.tls] implicit): Address already in use"
        in r.stderr
    ), r.stderr
    assert "Traceback" not in r.stderr
