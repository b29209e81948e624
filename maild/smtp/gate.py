"""The first protocol of every accepted connection: admission control before a session.

A crowd that reconnects as soon as it is refused (bench/hostile.py: about 40,000 refused
connections a minute) cost a whole aiosmtpd session each when admission control was
asked from inside the session: the protocol with its command tables (bound methods of
itself: reference cycles that only the garbage collector frees), a stream reader and
writer, a task and a session id, all to write one 421 line. Those were a tenth of
maild's CPU, and the cycles most of the time its garbage collector took (py-spy under
the full crowd), on the one event loop every client's session waits for.

The gate asks admission control at connect, answers a refusal itself (one write, then
close, as Postfix's smtpd answers a client anvil refused) and builds the session only
for a connection that has a slot: the session takes the transport over (set_protocol)
before a byte is read from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from maild.netaddr import Networks, is_trusted, peer_address
from maild.policy.context import Client
from maild.smtp.admission import Admission, Refusal, Slot

if TYPE_CHECKING:
    from maild.smtp.server import MaildSession, MaildSMTP


def _unset(_event: str) -> None:
    """A slot's notify until its session exists (set in the same step, see Door.enter)."""


@dataclass(eq=False)
class Door:
    """What the gate needs: the session factory, admission control, the trusted upstreams,
    the host name for the 421 line, and the handler's decision line for a refusal."""

    make: Callable[[], MaildSMTP]
    admission: Admission
    trusted: Networks
    hostname: str
    refused: Callable[[MaildSession, Refusal], None]
    # PROXY protocol peers: the client is named by the header the session reads first,
    # so the session asks admission control after it (MaildSMTP._handle_client).
    proxies: Networks = ()

    def factory(self) -> Gate:
        """For loop.create_server."""
        return Gate(self)

    def enter(self, transport: asyncio.BaseTransport) -> None:
        addr, port = peer_address(transport.get_extra_info("peername"))
        if self.proxies and is_trusted(addr, self.proxies):
            self._hand_over(transport, None)
            return
        trusted = is_trusted(addr, self.trusted)
        admission = self.admission
        slot = admission.admit(
            addr,
            reserved=trusted or admission.is_customer(addr),
            exempt=trusted,
            notify=_unset,
        )
        if isinstance(slot, Refusal):
            if slot.log:  # once per client per minute: a session only for the decision line
                from maild.smtp.server import MaildSession

                session = MaildSession(asyncio.get_running_loop())
                session.client = Client(addr=addr, port=port, trusted_peer=trusted, name="unknown")
                self.refused(session, slot)
            reply = slot.reply.replace(" 4.7.0 ", f" 4.7.0 {self.hostname} ", 1)
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(reply.encode() + b"\r\n")
            transport.close()
            return
        self._hand_over(transport, slot)

    def _hand_over(self, transport: asyncio.BaseTransport, slot: Slot | None) -> None:
        """The session takes the transport over (with its slot, or None: it is admitted
        after the PROXY header)."""
        try:
            proto = self.make()
        except BaseException:
            if slot is not None:
                self.admission.release(slot)
            transport.close()
            raise
        if slot is not None:
            slot.notify = proto._admission_event
        proto.admitted = slot
        transport.set_protocol(proto)
        proto.connection_made(transport)


class Gate(asyncio.Protocol):
    """Holds a new connection for the moment admission control decides (connection_made):
    nothing is read before the session takes the transport over."""

    __slots__ = ("door",)

    def __init__(self, door: Door):
        self.door = door

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.door.enter(transport)
