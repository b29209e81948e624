"""Real SMTP clients for integration tests: swaks, smtp-source and a raw socket."""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from .postfix import find_binary

_REPLY_RE = re.compile(r"^\s*(<-|<\*\*|<~|<~\*)\s+(\d{3})([ -]?)(.*)$")
_SEND_RE = re.compile(r"^\s*(->|~>|\*\*>)\s?(.*)$")
_QUEUED_RE = re.compile(r"queued as ([0-9A-Za-z]+)")


class Exchange(NamedTuple):
    """One server reply and the client command it answered."""

    command: str  # "CONNECT" for the banner, "." for the end of DATA, else the line sent
    code: int
    text: str  # all reply lines' text joined by "\n", without the codes


@dataclass
class SwaksResult:
    """A swaks run: exit status, transcript and the parsed replies."""

    returncode: int
    output: str
    exchanges: list[Exchange] = field(default_factory=list)

    @property
    def replies(self) -> list[tuple[int, str]]:
        """(code, text) of every reply the server sent, in order (banner first)."""
        return [(e.code, e.text) for e in self.exchanges]

    def codes_for(self, verb: str) -> list[int]:
        """Reply codes to every command starting with ``verb`` ("MAIL", "RCPT", ...)."""
        verb = verb.upper()
        return [e.code for e in self.exchanges if e.command.split(" ", 1)[0].upper() == verb]

    @property
    def banner_code(self) -> int | None:
        codes = self.codes_for("CONNECT")
        return codes[0] if codes else None

    @property
    def mail_code(self) -> int | None:
        codes = self.codes_for("MAIL")
        return codes[-1] if codes else None

    @property
    def rcpt_codes(self) -> list[int]:
        """Codes answered to each RCPT, in order."""
        return self.codes_for("RCPT")

    @property
    def data_code(self) -> int | None:
        """Final reply to the message (after the terminating "."); None if not reached."""
        codes = self.codes_for(".")
        return codes[-1] if codes else None

    @property
    def data_reply(self) -> str | None:
        texts = [e.text for e in self.exchanges if e.command == "."]
        return texts[-1] if texts else None

    @property
    def queue_id(self) -> str | None:
        """Postfix queue ID from "250 2.0.0 Ok: queued as ID", if any."""
        m = _QUEUED_RE.search(self.data_reply or "")
        return m.group(1) if m else None

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def parse_swaks(output: str) -> list[Exchange]:
    """Pair each server reply in a swaks transcript with the command it answers.

    Commands are queued as swaks prints them ("->" lines) so ``--pipeline``
    transcripts pair up too; message lines between a 354 and "." are skipped.
    """
    pending: list[str] = ["CONNECT"]
    exchanges: list[Exchange] = []
    in_data = False
    code: int | None = None
    texts: list[str] = []
    for line in output.splitlines():
        m = _REPLY_RE.match(line)
        if m:
            code = int(m.group(2))
            texts.append(m.group(4))
            if m.group(3) != "-":  # last line of the reply
                command = pending.pop(0) if pending else "?"
                exchanges.append(Exchange(command, code, "\n".join(texts)))
                if command.upper() == "DATA" and 300 <= code < 400:
                    in_data = True
                texts, code = [], None
            continue
        s = _SEND_RE.match(line)
        if s:
            sent = s.group(2)
            if in_data:
                if sent == ".":
                    in_data = False
                    pending.append(".")
                continue
            pending.append(sent)
    return exchanges


def swaks(
    server_port: int,
    *,
    frm: str,
    to: str | Iterable[str],
    server: str = "127.0.0.1",
    helo: str | None = None,
    data: str | bytes | None = None,
    header: Sequence[str] = (),
    body: str | bytes | None = None,
    bind: str | None = None,
    auth: tuple[str, str] | None = None,
    auth_type: str = "PLAIN",
    pipeline: bool = False,
    raw_data: bool = False,
    quit_after: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = 30,
) -> SwaksResult:
    """Run swaks against ``server:server_port`` and parse its transcript.

    ``data`` is the whole message.  swaks massages it: LF -> CRLF, a literal
    backslash-n becomes a line break, %TOKENS% (%FROM_ADDRESS%...) are
    expanded, leading dots stuffed.  ``raw_data=True`` sends it untouched
    (``--no-data-fixup``) and only appends the CRLF.CRLF terminator if missing;
    for a broken terminator or bare LF use ``raw_smtp``.  ``body`` replaces
    only swaks' default body.  Both go through stdin (never taken for file names).  ``header`` items are
    "Name: value" strings (replace swaks' header of that name, else add).
    ``bind`` is the local source address (e.g. "127.0.0.5").
    """
    binary = find_binary("swaks")
    if binary is None:
        raise RuntimeError("swaks not installed")
    if data is not None and body is not None:
        raise ValueError("give data or body, not both")
    rcpts = [to] if isinstance(to, str) else list(to)
    cmd = [binary, "--server", server, "--port", str(server_port), "--from", frm]
    cmd += ["--to", ",".join(rcpts), "--timeout", f"{int(max(timeout, 1))}s"]
    if helo is not None:
        cmd += ["--helo", helo]
    for h in header:
        cmd += ["--header", h]
    stdin: bytes | None = None
    if data is not None:
        cmd += ["--data", "-"]
        stdin = data.encode() if isinstance(data, str) else data
        if raw_data:
            cmd += ["--no-data-fixup"]
            if not stdin.endswith(b"\r\n.\r\n"):
                stdin += (b"" if stdin.endswith(b"\r\n") else b"\r\n") + b".\r\n"
    elif body is not None:
        cmd += ["--body", "-"]
        stdin = body.encode() if isinstance(body, str) else body
    if bind is not None:
        cmd += ["--local-interface", bind]
    if auth is not None:
        cmd += ["--auth", auth_type, "--auth-user", auth[0], "--auth-password", auth[1]]
    if pipeline:
        cmd += ["--pipeline"]
    if quit_after is not None:
        cmd += ["--quit-after", quit_after]
    cmd += list(extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWAKS_")}
    env["HOME"] = "/nonexistent"  # no ~/.swaksrc
    try:
        proc = subprocess.run(
            cmd,
            input=stdin if stdin is not None else b"",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # one stream keeps "<**" error replies in order
            timeout=timeout + 15,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        partial = (e.output or b"").decode("utf-8", "replace")
        raise AssertionError(f"swaks hung (> {timeout + 15}s): {cmd}\n{partial}") from e
    output = proc.stdout.decode("utf-8", "replace")
    return SwaksResult(proc.returncode, output, parse_swaks(output))


_FINAL_LINE = re.compile(rb"^\d{3}(?!-)")


def _complete_replies(buf: bytes) -> int:
    """Number of complete (final-line) replies in ``buf``."""
    return sum(1 for line in buf.split(b"\n")[:-1] if _FINAL_LINE.match(line))


def raw_smtp(
    port: int,
    chunks: Sequence[bytes],
    *,
    host: str = "127.0.0.1",
    bind: str | None = None,
    read_timeout: float = 5.0,
    reply_wait: float = 0.5,
) -> list[str]:
    """Send ``chunks`` byte-exactly on one connection; return every reply line.

    After the banner and after each chunk it waits for the next complete reply,
    at most ``reply_wait`` seconds (a chunk inside DATA gets no reply), then
    sends the next one; at the end it reads until the server closes or stays
    quiet for ``reply_wait``.  Nothing is added or normalised, so bare LF,
    bare CR and smuggling payloads reach the server as given.  The result is
    the server's lines without line ends, in order (banner first).
    """
    received = bytearray()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(read_timeout)
        if bind is not None:
            sock.bind((bind, 0))
        sock.connect((host, port))
        closed = False

        def read_until(deadline: float, want_replies: int | None) -> None:
            nonlocal closed
            while not closed:
                if want_replies is not None and _complete_replies(bytes(received)) >= want_replies:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    return
                try:
                    got = sock.recv(65536)  # readable: returns without blocking
                except OSError:
                    closed = True
                    return
                if not got:
                    closed = True
                    return
                received.extend(got)

        read_until(time.monotonic() + read_timeout, 1)  # banner
        for chunk in chunks:
            if closed:
                break
            before = _complete_replies(bytes(received))
            try:
                sock.sendall(chunk)
            except OSError:
                closed = True
                break
            read_until(time.monotonic() + reply_wait, before + 1)
        # Drain: until EOF, or quiet for reply_wait, within read_timeout overall.
        end = time.monotonic() + read_timeout
        while not closed and time.monotonic() < end:
            size = len(received)
            read_until(min(end, time.monotonic() + reply_wait), None)
            if len(received) == size:
                break
    text = bytes(received).decode("utf-8", "replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def reply_codes(lines: Iterable[str]) -> list[int]:
    """Codes of the complete replies in ``raw_smtp`` output (one per reply)."""
    return [int(line[:3]) for line in lines if re.match(r"^\d{3}(?!-)", line)]


def smtp_source(
    port: int,
    *,
    host: str = "127.0.0.1",
    sessions: int = 1,
    messages: int = 1,
    size: int | None = None,
    sender: str = "source@outside.example",
    recipient: str = "source-rcpt@hosted.example",
    extra: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run Postfix's smtp-source: ``messages`` messages over ``sessions`` parallel sessions."""
    binary = find_binary("smtp-source")
    if binary is None:
        raise RuntimeError("smtp-source not installed")
    cmd = [binary, "-s", str(sessions), "-m", str(messages), "-f", sender, "-t", recipient]
    if size is not None:
        cmd += ["-l", str(size)]
    cmd += [*extra, f"{host}:{port}"]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"smtp-source hung (> {timeout}s): {cmd}\n{e.output!r}") from e
