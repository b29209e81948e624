"""What maild's SMTP server calls on its handler besides aiosmtpd's handle_* hooks.

maild.smtp.proxy.Proxy implements it; MaildSMTP is typed with it, so a hook the server
calls and the handler lacks is a type error, not an AttributeError in a session.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from maild.address import Address
    from maild.policy.context import Context
    from maild.smtp.admission import Refusal
    from maild.smtp.data import Abort
    from maild.smtp.server import MaildSession


class SessionHooks(Protocol):
    def session_refused(self, session: MaildSession, refusal: Refusal) -> None:
        """Admission control refused the connection (refusal.reply follows)."""

    def session_shed(self, session: MaildSession, reply: str) -> None:
        """Admission control closes this idle stranger's session to make room."""

    def session_lost(self, session: MaildSession) -> None:
        """The connection closed: end its transaction, if any."""

    async def xforward_refused(self, session: MaildSession) -> None:
        """XFORWARD from a client that is not a trusted upstream (550 5.7.0 follows)."""

    def apply_xforward(self, session: MaildSession) -> None:
        """session.xforward changed: it defines the client that policy sees."""

    def path_refused(
        self, session: MaildSession, stage: str, reply: str, address: Address, rule: str
    ) -> None:
        """A MAIL or RCPT refused by the protocol rules before any policy ran."""

    def data_aborted(self, session: MaildSession, abort: Abort) -> None:
        """DATA was refused while it was read (abort.reply follows)."""

    def record(
        self,
        session: MaildSession,
        action: str,
        stage: str,
        reply: str,
        *,
        rule: str = "-",
        ctx: Context | None = None,
        rcpt: Address | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        """One decision: a syslog line and a decision-log row."""

    async def handle_exception(self, error: Exception) -> str:
        """An unexpected error in a session: the 4xx reply to give."""
