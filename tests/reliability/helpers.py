"""Tools the fault-injection, load and fuzz tests share: clients that classify outcomes,
process surgery on one private Postfix, RSS probes, a size-limited tmpfs.

Everything acts on processes and files this test run created: a Postfix instance is
identified by its MAIL_CONFIG (its own etc/ directory), never by a process name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tests.harness.postfix import Postfix
from tests.harness.waits import patience, wait_until

T = TypeVar("T")

# --------------------------------------------------------------------------- SMTP clients


@dataclass
class Attempt:
    """What one client attempt to deliver one message saw.

    ``final`` is the reply to the end of data (or to the command that refused the
    transaction); ``None`` with ``dropped`` set means the server closed the connection
    or went silent without answering: for the client that is a temporary failure.
    """

    replies: list[tuple[str, int, str]] = field(default_factory=list)
    final: int | None = None
    text: str = ""
    dropped: str = ""

    @property
    def accepted(self) -> bool:
        return self.final is not None and 200 <= self.final < 300

    @property
    def temporary(self) -> bool:
        return self.dropped != "" or (self.final is not None and 400 <= self.final < 500)

    def __str__(self) -> str:
        return (
            f"final={self.final} text={self.text!r} dropped={self.dropped!r} replies={self.replies}"
        )


def unique_subject(tag: str = "msg") -> str:
    return f"{tag}-{uuid.uuid4().hex[:16]}"


def message(subject: str, body: bytes = b"hello\r\n", extra: bytes = b"") -> bytes:
    return (
        (
            f"From: sender@outside.example\r\nTo: rcpt@hosted.example\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@outside.example>\r\n"
        ).encode()
        + extra
        + b"\r\n"
        + body
    )


def attempt(
    port: int,
    *,
    sender: str,
    rcpts: list[str],
    data: bytes,
    source: str,
    helo: str = "client.example",
    timeout: float = 60.0,
) -> Attempt:
    """One SMTP transaction with smtplib, classified; never raises for server behaviour."""
    a = Attempt()
    try:
        s = smtplib.SMTP(
            "127.0.0.1", port, local_hostname=helo, timeout=timeout, source_address=(source, 0)
        )
    except (OSError, smtplib.SMTPException) as e:
        a.dropped = f"connect: {e!r}"
        return a
    try:
        code, text = s.ehlo(helo)
        a.replies.append(("EHLO", code, text.decode("utf-8", "replace")))
        code, text = s.mail(sender)
        a.replies.append(("MAIL", code, text.decode("utf-8", "replace")))
        if code >= 400:
            a.final, a.text = code, text.decode("utf-8", "replace")
            return a
        ok = 0
        for r in rcpts:
            code, text = s.rcpt(r)
            a.replies.append(("RCPT", code, text.decode("utf-8", "replace")))
            if code < 400:
                ok += 1
            else:
                a.final, a.text = code, text.decode("utf-8", "replace")
        if not ok:
            return a
        code, text = s.data(data)
        a.final, a.text = code, text.decode("utf-8", "replace")
        a.replies.append((".", code, a.text))
        with contextlib.suppress(OSError, smtplib.SMTPException):
            s.quit()
    except smtplib.SMTPResponseException as e:
        # smtplib raises for a reply to DATA other than 354: that reply is the verdict.
        a.final, a.text = e.smtp_code, e.smtp_error.decode("utf-8", "replace")
        a.replies.append(("?", e.smtp_code, a.text))
    except (smtplib.SMTPServerDisconnected, OSError) as e:
        a.dropped = repr(e)
    finally:
        with contextlib.suppress(Exception):
            s.close()
    return a


def read_reply(sock: socket.socket) -> bytes:
    """One complete (possibly multi-line) reply; b'' if the server closed first."""
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return buf
        buf += chunk
        lines = buf.split(b"\r\n")
        if any(len(x) >= 4 and x[3:4] == b" " for x in lines[:-1]):
            return buf


def open_in_data(
    port: int, source: str, sender: str, rcpt: str, timeout: float = 30
) -> socket.socket:
    """A raw session that got 354 for DATA: the test decides what happens next."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    assert read_reply(s).startswith(b"220")
    for line, want in (
        (b"EHLO client.example\r\n", b"250"),
        (f"MAIL FROM:<{sender}>\r\n".encode(), b"250"),
        (f"RCPT TO:<{rcpt}>\r\n".encode(), b"250"),
        (b"DATA\r\n", b"354"),
    ):
        s.sendall(line)
        got = read_reply(s)
        assert got.startswith(want), (line, got)
    return s


def final_reply(sock: socket.socket) -> tuple[int | None, bytes]:
    """The reply after the end of data, or (None, why) when the connection just closed."""
    try:
        got = read_reply(sock)
    except OSError as e:
        return None, repr(e).encode()
    if not got:
        return None, b"closed without a reply"
    return int(got[:3]), got


# --------------------------------------------------------------------------- Postfix surgery


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        k, _, v = item.partition(b"=")
        out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def postfix_pids(pf: Postfix) -> list[int]:
    """Every process of this one Postfix instance (master and children share MAIL_CONFIG)."""
    etc = str(pf.etc)
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit() and _environ(int(d)).get("MAIL_CONFIG") == etc:
            pids.append(int(d))
    return sorted(pids)


def postfix_service_pids(pf: Postfix, program: str) -> list[int]:
    """Processes of one Postfix program ("cleanup", "qmgr", ...) of this instance."""
    return [p for p in postfix_pids(pf) if _cmdline(p).split(" ", 1)[0] == program]


def reinject_smtpd_pids(pf: Postfix) -> list[int]:
    """The re-injection smtpd processes (maild's downstream) of this instance."""
    tag = f"smtpd -n 127.0.0.1:{pf.reinject_port} "
    return [p for p in postfix_pids(pf) if _cmdline(p).startswith(tag)]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def wait_gone(pids: list[int], timeout: float = 10) -> None:
    timeout = patience(timeout)
    deadline = time.monotonic() + timeout
    while not all(_gone(p) for p in pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes still alive: {[p for p in pids if not _gone(p)]}")
        time.sleep(0.02)


def crash_postfix(pf: Postfix) -> list[int]:
    """SIGKILL every process of the instance, as a crash (or the OOM killer) would."""
    pids = postfix_pids(pf)
    assert pids, "this Postfix instance has no processes"
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    wait_gone(pids)
    pf._started = False  # the harness may start it again
    return pids


def wait_for(cond: Callable[[], T], what: str, timeout: float = 20.0, interval: float = 0.02) -> T:
    """Poll ``cond()`` until it returns something truthy (a bounded wait, not a timing check)."""
    value = wait_until(cond, timeout, interval)
    if not value:
        raise AssertionError(f"timed out waiting for {what}")
    return value


def in_sleep(pid: int) -> bool:
    """Is the process blocked in nanosleep/clock_nanosleep (x86-64 syscalls 35 and 230)?

    Postfix's `sleep` restriction is the only sleep on smtpd's path here, so this says
    exactly where in the protocol the downstream is, without guessing with timers.
    """
    try:
        nr = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return False
    return nr in ("35", "230")


def tcp_queues(port: int) -> list[tuple[int, int]]:
    """(tx_queue, rx_queue) of established loopback connections whose local port is ``port``."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                lport = int(fields[1].rsplit(":", 1)[1], 16)
                if lport == port and fields[3] == "01":  # 01 = ESTABLISHED
                    tx, rx = (int(x, 16) for x in fields[4].split(":"))
                    out.append((tx, rx))
    return out


def copies(pf: Postfix, address: str, needle: str) -> int:
    """How many delivered messages in ``address``'s Maildir contain ``needle``."""
    with contextlib.suppress(ValueError):
        return sum(needle.encode() in m for m in pf.messages(address))
    return 0


def settle(pf: Postfix, timeout: float = 30.0) -> None:
    """Let Postfix deliver all it has (flushing deferred mail) before counting copies.

    Counts complete messages (postqueue), not files: a crash leaves cleanup's unfinished
    file in incoming/, which is no message and never delivered.
    """
    pf.flush()
    wait_for(lambda: pf.mailq() == [], "the Postfix queue to drain", timeout=timeout, interval=0.2)


# --------------------------------------------------------------------------- maild process


def rss_kb(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB, from /proc/PID/status."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            vals[k] = int(v.split()[0])
    return vals["VmRSS"], vals["VmHWM"]


def decision_rows(
    db: Path,
    sql: str = "SELECT session, action, stage, code, sender, recipient FROM decisions ORDER BY id",
    params: tuple = (),
) -> list[tuple]:
    """Read maild's decision log from outside, as `maild log` would (WAL: readers never block)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def relay_sessions_for(db: Path, sender: str) -> list[str]:
    rows = decision_rows(
        db, "SELECT session FROM decisions WHERE action = 'relay' AND sender = ?", (sender,)
    )
    return [r[0] for r in rows]


# --------------------------------------------------------------------------- filesystems


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A private, size-limited tmpfs at ``path`` (root only): a filesystem the test can fill."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> int:
    """Write a filler file until the filesystem says ENOSPC; returns bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    n = 0
    try:
        block = b"\0" * 65536
        while True:
            try:
                n += os.write(fd, block)
            except OSError as e:
                if e.errno != 28:
                    raise
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    return n


def chattr(flag: str, *paths: Path) -> None:
    """chattr +i / -i: immutable even for root, and for file descriptors already open."""
    for p in paths:
        if p.exists():
            subprocess.run(["chattr", flag, str(p)], check=True, capture_output=True)
