"""Mail in flight: a RAM budget for message content, and a spool file past a threshold.

Postfix keeps a message in transit in a queue file, not in memory; aiosmtpd reads DATA
into one bytes object, and maild's relay made copies of it, so every concurrent 24 MB
message cost about 50 MB of RSS. Here a message is read into RAM only up to
`[server.limits] spool_threshold` (and only while the budget `memory_in_flight`, shared
by every session, has room); past that it goes on to a private temporary file in the
state directory, and the downstream gets it from there in blocks.

The spool file is made with tempfile.TemporaryFile: on Linux O_TMPFILE, mode 0600, with
no name in the directory at any moment, so it is gone on every path out (the session's
end, an exception, a crash, SIGKILL). Where O_TMPFILE is missing, the file is unlinked
the moment it is created.

What stays in RAM for a spooled message is its header block and the first
spool_threshold bytes (Content.head): what the rules read. Every content check maild has
reads at most that much anyway (textsig: 512 KB for the MIME parser, 64 KB of text), so
a rule's cost no longer grows with the message.

When even the header block cannot be held (the budget is spent by other sessions'
messages and this one's header runs on), or the spool file cannot be written (disk
full), the message is refused with 452 4.3.1 after its end of data: the client retries.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

log = logging.getLogger("maild.smtp")

REPLY_BUDGET = "452 4.3.1 Insufficient system resources: too much mail in transit; try again later"
REPLY_STORAGE = "452 4.3.1 Insufficient system storage; try again later"
BLOCK = 256 * 1024  # bytes read from a spool file at a time, for the relay
TRIM_AFTER = 16 * 1024 * 1024  # mail in RAM after which settle() gives memory back


def _malloc_trim() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class SpoolError(Exception):
    """The message cannot be held: its reply (452 4.3.1) is the argument."""

    @property
    def reply(self) -> str:
        return str(self.args[0])


class Budget:
    """Bytes of message content in RAM, over all sessions."""

    def __init__(self, total: int, threshold: int, spool_dir: str):
        self.total = total
        self.threshold = threshold
        self.spool_dir = spool_dir
        self.in_use = 0
        self.peak = 0
        self.spooling = 0  # spool files open now
        self.spooled = 0  # messages spooled since start
        self.refused = 0  # 452 4.3.1 answered since start
        self._warned = False
        self._busy = False  # more than TRIM_AFTER in RAM since the last settle()

    def charge(self, n: int) -> bool:
        if self.in_use + n > self.total:
            return False
        self.in_use += n
        self.peak = max(self.peak, self.in_use)
        self._busy = self._busy or self.in_use > TRIM_AFTER
        return True

    def credit(self, n: int) -> None:
        self.in_use -= n

    def sink(self) -> Sink:
        return Sink(self)

    def open_spool(self) -> BinaryIO:
        try:
            # closed by close_spool(), when the transaction ends
            f = tempfile.TemporaryFile(dir=self.spool_dir, prefix="maild-spool-")  # noqa: SIM115
        except OSError as e:
            if not self._warned:
                log.error(
                    "error: cannot create a spool file in %s: %s; messages larger "
                    "than spool_threshold are answered 452 4.3.1",
                    self.spool_dir,
                    e.strerror or e,
                )
                self._warned = True
            raise SpoolError(REPLY_STORAGE) from e
        self._warned = False
        self.spooling += 1
        self.spooled += 1
        return f

    def close_spool(self, f: BinaryIO) -> None:
        self.spooling -= 1
        f.close()

    def settle(self) -> None:
        """Once the mail in flight has gone after a busy spell, give the freed heap back
        to the system (glibc's malloc_trim): CPython frees the buffers, but glibc keeps
        the memory of blocks allocated while many messages were read, and RSS would
        stay near its peak. Called every 2 s by the daemon; a no-op without glibc."""
        if self.in_use or self.spooling or not self._busy:
            return
        self._busy = False
        _malloc_trim()

    def status(self) -> dict[str, int]:
        """For `maild status`."""
        return {
            "memory_in_flight": self.in_use,
            "memory_in_flight_limit": self.total,
            "memory_in_flight_peak": self.peak,
            "spooling": self.spooling,
            "spooled": self.spooled,
            "refused_452": self.refused,
        }


@dataclass(eq=False)
class Sink:
    """Where DATA is read to: RAM while the message is small, then a spool file.

    extend() takes bytes as bytearray.extend does (the DATA reader writes to either);
    when the message cannot be held it drops the content and sets `error` (the 452 4.3.1
    reply): the reader reads on to the end of data, then the server replies. finish()
    hands the message over as a Content, which owns its RAM charge and file until closed.
    """

    budget: Budget
    buf: bytearray = field(default_factory=bytearray)
    size: int = 0
    file: BinaryIO | None = None
    header_end: int = -1  # offset just past the blank line ending the header, once found
    charged: int = 0
    dropped: bool = False
    error: str | None = None

    def __len__(self) -> int:
        return self.size

    def extend(self, data: bytes | bytearray | memoryview) -> None:
        if self.dropped:
            return
        start = self.size
        self.size += len(data)
        try:
            if self.file is None:
                if self.size <= self.budget.threshold and self.budget.charge(len(data)):
                    self.charged += len(data)
                    self.buf += data
                    return
                self.file = self.budget.open_spool()
                self.file.write(self.buf)
                self._find_header()
            self.file.write(data)
            if len(self.buf) == start:
                self._hold(data)
        except SpoolError as e:
            self._fail(e.reply)
        except OSError as e:
            log.error(
                "error: cannot write a spool file in %s: %s", self.budget.spool_dir, e.strerror or e
            )
            self._fail(REPLY_STORAGE)

    def _fail(self, reply: str) -> None:
        self.budget.refused += 1
        self.error = reply
        self.clear()

    def _find_header(self) -> None:
        i = self.buf.find(b"\r\n\r\n")
        if i >= 0:
            self.header_end = i + 4

    def _hold(self, data: bytes | bytearray | memoryview) -> None:
        """A spooled message keeps its header block and first `threshold` bytes in RAM
        (charged to the budget) for the rules."""
        if self.header_end < 0:
            tail = min(3, len(self.buf))
            i = (bytes(self.buf[len(self.buf) - tail :]) + bytes(data)).find(b"\r\n\r\n")
            if i >= 0:
                self.header_end = len(self.buf) - tail + i + 4
        want = need = len(data)  # until the header ends, all of it is needed
        if self.header_end >= 0:
            keep = max(self.budget.threshold, self.header_end)
            want = max(0, min(want, keep - len(self.buf)))
            need = max(0, min(want, self.header_end - len(self.buf)))
        # Beyond the header, the first bytes are held only while the budget has room.
        take = min(want, max(need, self.budget.total - self.budget.in_use))
        if take and not self.budget.charge(take):
            raise SpoolError(REPLY_BUDGET)
        self.charged += take
        self.buf += data[:take]

    def clear(self) -> None:
        """Drop the content; what follows is not kept either."""
        self.dropped = True
        self.close()

    def close(self) -> None:
        self.budget.credit(self.charged)
        self.charged = 0
        self.buf = bytearray()
        if self.file is not None:
            self.budget.close_spool(self.file)
            self.file = None

    def finish(self) -> Content:
        """The message read; the sink is empty afterwards."""
        if self.file is not None:
            self.file.flush()
        content = Content(
            budget=self.budget,
            head=bytes(self.buf),
            size=self.size,
            file=self.file,
            charged=self.charged,
            header_end=self.header_end,
        )
        self.file, self.charged, self.buf = None, 0, bytearray()
        return content


@dataclass(eq=False)
class Content:
    """A message read: in RAM (`head` is all of it) or spooled (`head` holds its header
    block and first bytes, for the rules; `file` all of it). close() when the
    transaction ends, on every path: it gives back the RAM charge and the file."""

    budget: Budget
    head: bytes
    size: int
    file: BinaryIO | None = None
    charged: int = 0
    header_end: int = -1  # where the body starts (found for every spooled message)
    pinned: bool = False  # a relay still reads it: closed when that ends (pin_until)

    @property
    def spooled(self) -> bool:
        return self.size > len(self.head)

    def blocks(self, offset: int = 0, block: int = BLOCK) -> Iterator[bytes]:
        """The content from `offset` to the end, in blocks: from RAM, or from the spool
        file with os.pread (one block in RAM at a time, in the page cache rather than in
        this process's memory)."""
        if not self.spooled:
            for pos in range(offset, self.size, block):
                yield self.head[pos : pos + block]
            return
        if self.file is None:
            raise ValueError("spool file closed")
        fd = self.file.fileno()
        pos = offset
        while pos < self.size:
            data = os.pread(fd, min(block, self.size - pos), pos)
            if not data:
                raise OSError("spool file shorter than the message")
            pos += len(data)
            yield data

    def close(self) -> None:
        if self.file is not None:
            self.budget.close_spool(self.file)
            self.file = None
        self.budget.credit(self.charged)
        self.charged = 0

    def pin_until(self, task: asyncio.Future[Any]) -> None:
        """Keep the content until `task` (a relay the session no longer waits for) ends."""
        self.pinned = True
        task.add_done_callback(lambda _t: self.close())

    def __del__(self) -> None:  # a path that forgot close() must not leak the budget
        if self.file is not None or self.charged:
            self.close()
