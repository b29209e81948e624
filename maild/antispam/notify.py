"""Warning and block notices, sent through the downstream like any other mail.

"For a first offence, education": the notice says what happened, which rule, what to
change, and whom to write to. It goes to the customer's contact address and to
postmaster (so the provider's staff see it), from the null sender so that it can never
bounce back into a loop, and bypasses maild's own rules (it is maild's own mail).
Sending is retried a few times; every attempt's outcome is an event in the store.
"""

from __future__ import annotations

import logging
import uuid
from email.message import EmailMessage
from email.utils import format_datetime, localtime

from maild.config import Config
from maild.smtp.downstream import Downstream
from maild.smtp.submit import as_bytes, submit

log = logging.getLogger("maild.sanctions")

ADVICE = {
    "ratelimit": "Your mail exceeded a sending rate limit. If a script or a compromised "
    "account is sending, stop it and change the account's password; if the "
    "volume is legitimate, ask us for a higher tier.",
    "bulk": "Many copies of substantially the same message were sent (Breidbart index over "
    "the threshold). Bulk mail is allowed only to recipients who opted in: register "
    "the mailing list with us and send only to confirmed subscribers.",
    "optin": "List mail was sent to recipients whose consent we could not verify. Send list "
    "mail only to confirmed subscribers and honour unsubscribe requests at once.",
    "headers": "Messages carried forged or invalid headers (From:, Sender:, Reply-To: must be "
    "your own addresses unless the owner gave you permission).",
}


def provider_addresses(config: Config) -> tuple[str, str]:
    """(postmaster address, abuse contact) of this installation."""
    domain = (
        config.postmaster.domains or config.postmaster.hostnames or (config.server.hostname,)
    )[0]
    s = config.sections.get("sanctions")
    contact = getattr(s, "contact", "") or f"abuse@{domain}"
    sender = getattr(s, "notify_from", "") or f"postmaster@{domain}"
    return sender, contact


def compose(
    config: Config, customer: str, action: str, reason: str, strikes: int
) -> tuple[EmailMessage, list[str]]:
    sender, contact = provider_addresses(config)
    c = config.customer(customer)
    to = [c.contact] if c and c.contact else []
    rcpts = to + [sender]
    rule = reason.split("latest: ", 1)[-1].split(":", 1)[0]
    advice = next((v for k, v in ADVICE.items() if rule.startswith(k)), "")
    msg = EmailMessage()
    msg["From"] = f"Mail abuse desk <{sender}>"
    msg["To"] = ", ".join(to) if to else sender
    if to:
        msg["Cc"] = sender
    msg["Subject"] = (
        f"[maild] Warning: outbound mail from {customer}"
        if action == "warn"
        else f"[maild] Blocked: outbound mail from {customer}"
    )
    msg["Date"] = format_datetime(localtime())
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@{config.server.hostname}>"
    msg["Auto-Submitted"] = "auto-generated"
    msg["Reply-To"] = contact
    if action == "warn":
        head = (
            "This is a warning about mail sent from your account. Mail still flows, but "
            "if it happens again your outbound mail will be blocked."
        )
    else:
        head = (
            "Outbound mail from your account is now BLOCKED: every message is refused "
            "(except mail to postmaster and abuse addresses)."
        )
    msg.set_content(
        f"{head}\n\nCustomer: {customer}\nWhat happened: {reason}\nOffences counted: {strikes}\n\n"
        f"{advice}\n\nTo ask questions or request that the block be lifted, write to {contact}.\n"
    )
    return msg, rcpts


async def send(
    downstream: Downstream,
    config: Config,
    customer: str,
    action: str,
    reason: str,
    strikes: int,
    *,
    attempts: int = 3,
    delay: float = 30.0,
) -> bool:
    msg, rcpts = compose(config, customer, action, reason, strikes)
    reply, took = await submit(
        downstream,
        "",
        rcpts,
        as_bytes(msg),
        attempts=attempts,
        delay=delay,
        what=f"notice={action} customer={customer}",
    )
    if reply is not None and took:
        log.warning(
            "sanction: customer=%s notice=%s to=%s status=%d %s",
            customer,
            action,
            ",".join(took),
            reply.code,
            reply.text.splitlines()[0] if reply.text else "",
        )
        return True
    log.error("sanction: customer=%s notice=%s not sent", customer, action)
    return False
