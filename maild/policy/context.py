"""The typed context every rule reads: who is sending, as whom, what, to whom.

One context lives for one SMTP transaction; the proxy fills it in as the session goes
(connect, MAIL, RCPT, end of data). Rules only read it, which keeps them pure functions
that unit tests can call with a context built by hand.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

from maild.address import Address
from maild.config import Config, Customer
from maild.netaddr import parse_ip
from maild.policy.services import Services
from maild.policy.verdict import Verdict


class Stage(StrEnum):
    CONNECT = "CONNECT"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"


@dataclass(slots=True)
class Client:
    """The real SMTP client: the peer, or what a trusted upstream said via XFORWARD."""

    addr: str
    name: str = "unknown"
    port: str = ""
    helo: str = ""
    proto: str = "SMTP"
    ident: str = ""
    source: str = ""
    trusted_peer: bool = False

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        return parse_ip(self.addr)

    @property
    def label(self) -> str:
        """host[1.2.3.4], as Postfix names clients in its logs."""
        return f"{self.name or 'unknown'}[{self.addr}]"


@dataclass(slots=True)
class Identity:
    """Which customer sends, and how maild knows (login > network > domain)."""

    customer: Customer | None = None
    by: str = "-"  # "login", "network", "domain" or "-"
    login: str = ""

    @property
    def name(self) -> str:
        return self.customer.name if self.customer else "-"

    @property
    def may_relay(self) -> bool:
        """A sender domain proves nothing (anyone can write it): only login or network."""
        return self.customer is not None and self.by in ("login", "network")


@dataclass
class Message:
    """The message content at end of data, parsed at most once, lazily.

    For a message spooled to disk (maild.smtp.budget), `content` is its header block and
    first bytes, what every rule reads at most, and `spooled_size` its whole size.
    """

    content: bytes
    spooled_size: int = 0

    @cached_property
    def header_block(self) -> bytes:
        end = self.content.find(b"\r\n\r\n")
        return self.content if end < 0 else self.content[: end + 2]

    @cached_property
    def headers(self) -> email.message.Message:
        return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
            self.header_block + b"\r\n"
        )

    @property
    def size(self) -> int:
        return self.spooled_size or len(self.content)

    @cached_property
    def plain_body(self) -> bytes | None:
        """The body, when the header section ends at the first CRLF CRLF (every line
        before it a header field: the header parse left nothing over) and there is no
        Content-Type or Content-Transfer-Encoding field: text/plain in US-ASCII, whose
        content is the body's bytes as they are. None for any other message."""
        counts = self.field_counts
        if "content-type" in counts or "content-transfer-encoding" in counts:
            return None
        end = self.content.find(b"\r\n\r\n")
        if end < 0 or self.headers.get_payload() != "":
            return None
        return self.content[end + 4 :]

    @cached_property
    def field_counts(self) -> dict[str, int]:
        """How often each header field occurs, by lower-case name (RFC 5322 3.6 limits)."""
        counts: dict[str, int] = {}
        for name in self.headers:
            key = name.strip().lower()
            counts[key] = counts.get(key, 0) + 1
        return counts

    @cached_property
    def header_values(self) -> dict[str, list[str]]:
        """Every header field's values by lower-case name, as str(get_all(name)) gives them
        (compat32: 8-bit values as unknown-8bit Header objects): the header is walked once,
        not once per get()/get_all() of each check."""
        out: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            out.setdefault(name.lower(), []).append(str(value))
        return out

    @cached_property
    def mailboxes(self) -> dict[str, tuple[tuple[str, str, str], ...] | None]:
        """From/Sender/Reply-To as ((display name, addr-spec, domain), ...) per field, or
        None for a malformed field; parsed once, shared by the forged-header checks."""
        from maild.policy.mailboxes import parse_mailboxes

        return parse_mailboxes(self.headers)

    @cached_property
    def decoded_headers(self) -> dict[str, list[str]]:
        """From/Sender/Reply-To values with RFC 2047 encoded words decoded, comments kept."""
        from maild.policy.mailboxes import decoded_values

        return decoded_values(self.headers)


@dataclass
class Context:
    config: Config
    session_id: str
    client: Client
    identity: Identity = field(default_factory=Identity)
    stage: Stage = Stage.CONNECT
    sender: Address | None = None
    mail_params: list[str] = field(default_factory=list)
    rcpt: Address | None = None  # the recipient being judged at RCPT
    recipients: list[Address] = field(default_factory=list)  # accepted so far
    postmaster_only: bool | None = None  # None until the first recipient
    # Recipients outside the hosted domains accepted before the login is known
    # (before-queue mode): the relay rule adds them, pipeline.rcpt_done drops the ones the
    # downstream refused, and the DATA relay rule refuses them if no login came.
    relay_pending: list[Address] = field(default_factory=list)
    # A MAIL-stage refusal, given to every recipient but postmaster (pipeline.mail).
    mail_verdict: Verdict | None = None
    finished: bool = False  # pipeline.finish ran
    services: Services = field(default_factory=Services, repr=False, compare=False)
    message: Message | None = None
    # Rules may leave notes for later stages and for the log line (rule -> value).
    notes: dict[str, object] = field(default_factory=dict)
    # Header lines (name, value) rules ask the proxy to add to the relayed message,
    # e.g. ("X-Maild-Verdict", "...") in tag mode. The proxy folds and encodes them.
    add_headers: list[tuple[str, str]] = field(default_factory=list)
    # Values a rule family derives from the context once per transaction (the forged-header
    # checks' settings, skip reasons and overrides): caches only, never logged.
    cache: dict[str, object] = field(default_factory=dict, repr=False, compare=False)

    @property
    def hosted(self) -> frozenset[str]:
        return self.config.hosted_domains
