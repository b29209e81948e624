"""Mail that maild itself sends (notices, opt-in confirmations), through the downstream.

It bypasses maild's own rules (it is maild's mail) but not Postfix's: the downstream
queues it like any other message. Retried a few times; the caller learns the outcome.
"""

from __future__ import annotations

import asyncio
import logging
from email.message import EmailMessage

from maild.smtp.downstream import Downstream, DownstreamError, Reply

log = logging.getLogger("maild.smtp")


def as_bytes(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


async def submit(
    downstream: Downstream,
    mail_from: str,
    rcpts: list[str],
    data: bytes,
    *,
    attempts: int = 3,
    delay: float = 30.0,
    what: str = "message",
) -> tuple[Reply | None, list[str]]:
    """(final reply, recipients the downstream took); (None, []) if it never got through."""
    for attempt in range(1, attempts + 1):
        try:
            conn, _ = await downstream.acquire()
        except DownstreamError as e:
            log.error("submit: %s attempt=%d: %s", what, attempt, e)
            if attempt < attempts:
                await asyncio.sleep(delay)
            continue
        try:
            accepted: list[str] = []
            r = await downstream.command(conn, f"MAIL FROM:<{mail_from}>")
            if r.ok:
                for a in rcpts:
                    if (await downstream.command(conn, f"RCPT TO:<{a}>")).ok:
                        accepted.append(a)
            if accepted:
                r = await downstream.data(conn, data)
            else:
                await downstream.command(conn, "RSET")
            downstream.release(conn, reusable=True)
            if r.ok and accepted:
                return r, accepted
            log.error(
                "submit: %s refused: %d %s", what, r.code, r.text.splitlines()[0] if r.text else ""
            )
            if r.code >= 500:
                return r, []
        except DownstreamError as e:
            downstream.release(conn, reusable=False)
            log.error("submit: %s attempt=%d: %s", what, attempt, e)
        if attempt < attempts:
            await asyncio.sleep(delay)
    return None, []
