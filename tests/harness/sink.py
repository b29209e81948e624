"""Debian's smtp-sink as a scriptable downstream SMTP server.

By default it answers 250 to everything.  Refusals come from smtp-sink's own
options, passed through ``extra_args``:

* ``("-f", "RCPT")``  hard 5xx reply to RCPT (``-B`` sets the text)
* ``("-r", "DATA")``  soft 4xx reply to DATA (``-b`` sets the text); commands
  may be combined: ``("-r", "RCPT,.")``; ``"."`` is the end of DATA
* ``("-Q", "MAIL")``  421 and disconnect; ``("-q", "DATA")`` silent disconnect
* ``("-w", "10")``    delay the DATA reply; ``("-W", "rcpt:5")`` delay a command
* ``("-F",)``         no XFORWARD; ``("-C",)`` no XCLIENT; ``("-e",)`` no ESMTP

With ``dump_dir`` every transaction is written to one file there; ``messages()``
returns the complete ones (files still open in smtp-sink are skipped).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.waits import patience

from .ports import free_port, listened_by, port_open
from .postfix import PostfixError, cleanup_runtime_dir, find_binary, runtime_dir


@dataclass
class SinkMessage:
    """One transaction as smtp-sink recorded it (``data`` has LF line ends)."""

    client_addr: str
    helo: str | None
    mail_from: str  # the MAIL FROM argument(s), e.g. "<a@b.example> SIZE=12"
    rcpt_to: list[str] = field(default_factory=list)  # RCPT TO argument(s), in order
    data: bytes = b""


def parse_dump(raw: bytes) -> SinkMessage:
    """Split an smtp-sink dump into its envelope records and the message."""
    lines = raw.split(b"\n")
    msg = SinkMessage(client_addr="", helo=None, mail_from="")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(b"Received: "):
            i += 1
            while i < len(lines) and lines[i][:1] in (b"\t", b" "):
                i += 1
            break
        name, _, value = line.decode("utf-8", "replace").partition(": ")
        if name == "X-Client-Addr":
            msg.client_addr = value
        elif name == "X-Helo-Args":
            msg.helo = value
        elif name == "X-Mail-Args":
            msg.mail_from = value
        elif name == "X-Rcpt-Args":
            msg.rcpt_to.append(value)
        i += 1
    data = b"\n".join(lines[i:])
    # The dump format appends one empty line after the message.
    msg.data = data[:-1] if data.endswith(b"\n\n") else data
    return msg


class SmtpSink:
    """smtp-sink on 127.0.0.1:``port`` (a free one by default).

    Runs as ``nobody`` when started by root (smtp-sink insists on ``-u``).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        dump_dir: Path | str | None = None,
        extra_args: Sequence[str] = (),
        host: str = "127.0.0.1",
        backlog: int = 64,
    ) -> None:
        self.port = port or free_port()
        self.host = host
        self.requested_dump_dir = Path(dump_dir).absolute() if dump_dir is not None else None
        self.dump_dir: Path | None = None  # the real directory, set by start()
        self.extra_args = tuple(extra_args)
        self.backlog = backlog
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_dir: Path | None = None

    @property
    def log_path(self) -> Path | None:
        return self._log_dir / "smtp-sink.log" if self._log_dir else None

    def command(self) -> list[str]:
        binary = find_binary("smtp-sink")
        if binary is None:
            raise PostfixError("smtp-sink not installed")
        cmd = [binary]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        if self.requested_dump_dir is not None:
            if self.dump_dir is None:
                # smtp-sink writes as nobody: pytest's 0700 tmp dirs are out of reach.
                self.dump_dir, _ = runtime_dir(self.requested_dump_dir, "maild-sink-")
            cmd += ["-d", f"{self.dump_dir}/%s."]
        cmd += [*self.extra_args, f"{self.host}:{self.port}", str(self.backlog)]
        return cmd

    def start(self, timeout: float = 10.0) -> SmtpSink:
        """Start smtp-sink and wait until it accepts connections."""
        timeout = patience(timeout)
        if self.running:
            return self
        cmd = self.command()
        if self.dump_dir is not None and os.geteuid() == 0:
            shutil.chown(self.dump_dir, "nobody")
        self._log_dir = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
        with open(self._log_dir / "smtp-sink.log", "wb") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while not (listened_by(self._proc.pid, self.port) and port_open(self.port, self.host)):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                out = self.output()
                self.stop()
                raise PostfixError(f"smtp-sink did not start: {cmd}\n{out}")
            time.sleep(0.02)
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def output(self) -> str:
        """What smtp-sink printed (errors; the conversation with ``-v``)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop smtp-sink; safe to call twice or after a failed start."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5)
            self._proc = None

    def close(self) -> None:
        """``stop()``, remove the private log dir and a dump dir made in /tmp."""
        self.stop()
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None
        if self.dump_dir is not None:
            cleanup_runtime_dir(self.dump_dir)
            if self.requested_dump_dir is not None and self.requested_dump_dir.is_symlink():
                self.requested_dump_dir.unlink(missing_ok=True)

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()

    # ------------------------------------------------------------- captures

    def _open_files(self) -> set[str]:
        if not self.running or self._proc is None:
            return set()
        fd_dir = Path(f"/proc/{self._proc.pid}/fd")
        open_files: set[str] = set()
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    open_files.add(os.readlink(fd))
        return open_files

    def dump_files(self) -> list[Path]:
        """Complete dump files, oldest first."""
        if self.requested_dump_dir is None:
            raise ValueError("SmtpSink was created without dump_dir")
        if self.dump_dir is None or not self.dump_dir.is_dir():
            return []
        busy = self._open_files()
        files = [f for f in self.dump_dir.iterdir() if f.is_file() and str(f) not in busy]
        files.sort(key=lambda f: (f.stat().st_mtime_ns, f.name))
        return files

    def messages(self) -> list[bytes]:
        """Raw dump of every complete transaction (envelope records + message)."""
        return [f.read_bytes() for f in self.dump_files()]

    def parsed(self) -> list[SinkMessage]:
        """``messages()`` split into envelope and data."""
        return [parse_dump(m) for m in self.messages()]

    def wait_for_messages(self, n: int = 1, timeout: float = 20.0) -> list[SinkMessage]:
        """Poll until at least ``n`` transactions were dumped; AssertionError otherwise."""
        timeout = patience(timeout)
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.parsed()
            if len(msgs) >= n:
                return msgs
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"smtp-sink on port {self.port}: {len(msgs)} message(s) after "
                    f"{timeout}s, wanted {n}\n{self.output()}"
                )
            time.sleep(0.05)
