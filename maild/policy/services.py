"""The long-lived services rules consult, passed in by whoever runs the pipeline.

The daemon builds one Services and fills it as each component starts; every Context of
a transaction carries it (ctx.services), so rules stay functions of their context and a
unit test builds its own (with an injected clock). A service left as None means the
feature is not running, and its rules have no opinion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from maild.antispam.campaigns import Campaigns
    from maild.antispam.limiter import Limiter
    from maild.antispam.sanctions import Sanctions
    from maild.optin.service import OptinService


class ClientSessions(Protocol):
    """Sessions in flight per *real* client address (XFORWARD ADDR where a trusted
    upstream sent it), kept by the front end; maild.smtp.sessions.SessionCounter."""

    clients: dict[str, int]

    def client_add(self, addr: str) -> None: ...

    def client_remove(self, addr: str) -> None: ...


class ListKeys(Protocol):
    """The one-click URL keys of the lists ([web]; maild.web.app.WebService)."""

    async def list_key(self, list_id: str) -> bytes: ...


@dataclass
class Services:
    limiter: Limiter | None = None
    campaigns: Campaigns | None = None
    sanctions: Sanctions | None = None
    optin: OptinService | None = None
    web: ListKeys | None = None
    sessions: ClientSessions | None = None
