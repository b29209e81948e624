"""Admission control at connect: who gets one of maild's session slots.

Postfix's ideas, applied to one asyncio process instead of a pool of smtpd processes:

- anvil(8): per-client connection count and rate (smtpd_client_connection_count_limit,
  smtpd_client_connection_rate_limit). Trusted upstreams are exempt: they carry many
  clients. In before-queue mode every session comes from Postfix, whose anvil,
  postscreen and process limit are the admission control; these limits matter in front
  mode, where maild faces the clients.
- a reserved share of the slots for customer networks and trusted upstreams, so a crowd
  of strangers cannot keep customers (or Postfix handing maild a customer) out;
- a full house makes room by closing an idle session (421 4.7.0): for a customer, the
  stranger that has waited longest for its next command; for a stranger, the longest-idle
  session of the address holding the most slots, and only if that address holds at least
  two more than the newcomer's. So a stranger writing to postmaster from an address of
  its own gets in while a crowd from a few addresses parks in the slots, and the crowd
  cannot churn the slots by reconnecting (a reconnecting address already holds its
  share). Against parked sessions from as many addresses as slots, only the stress
  timeouts free slots: then a newcomer waits for one, as with postscreen's
  postscreen_pre_queue_limit;
- stress mode (smtpd_timeout = ${stress?{10}:{300}}): while slots run short, a
  stranger's command and DATA timeouts shrink; one log line when stress starts, one when
  it ends.

Refusals are logged once per client per minute (LogOnce), not once per connection: a
client hammering the port must not turn into a syslog flood.

Pure logic (an injectable clock); maild.smtp.server asks it at connect, tells it when a
session waits for a command and when it works, and closes the sessions it sheds.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maild.config import Limits

log = logging.getLogger("maild.smtp")

# A session in a transaction (after MAIL) idle for less than this is never shed: a burst
# of new connections must not close the ones between two commands of a transaction. One
# with no transaction loses nothing but its connection: it may be shed at once.
SHED_MIN_IDLE = 1.0
RATE_WINDOW = 60.0  # anvil_rate_time_unit
MAX_TRACKED = 100_000  # clients whose connection times are remembered
# Stress ends when the sessions in flight fall below this share of where it started, so
# a load hovering at the threshold does not log a start and an end every second.
STRESS_END = 0.75


class LogOnce:
    """Once per key per `window` seconds: say() is True for the first event of a window
    and returns how many were left unsaid since the last line (for "N more").

    A key is forgotten a window after its window is over (looked for once a window, as
    the connection-rate table is pruned): a crowd of many addresses must not leave an
    entry per address behind for good, and a client still at it in the next window is
    told how many were unsaid. One back later than that starts a new count."""

    def __init__(
        self,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_TRACKED,
    ):
        self.window = window
        self.clock = clock
        self.max_keys = max_keys
        self._last: dict[Any, float] = {}
        self._unsaid: dict[Any, int] = {}
        self._pruned = clock()

    def say(self, key: Any) -> tuple[bool, int]:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.window:
            self._unsaid[key] = self._unsaid.get(key, 0) + 1
            return False, 0
        if len(self._last) >= self.max_keys:
            self._forget(now, self.window)
        elif now - self._pruned >= self.window:
            self._forget(now, 2 * self.window)
        self._last[key] = now
        return True, self._unsaid.pop(key, 0)

    def _forget(self, now: float, age: float) -> None:
        self._pruned = now
        for k in [k for k, t in self._last.items() if now - t >= age]:
            del self._last[k]
            self._unsaid.pop(k, None)
        while len(self._last) >= self.max_keys:
            k = next(iter(self._last))
            del self._last[k]
            self._unsaid.pop(k, None)


def _released(_event: str) -> None:
    """A released slot's notify."""


@dataclass(eq=False)
class Slot:
    """One admitted session, as admission control sees it."""

    addr: str
    reserved: bool  # a customer network or a trusted upstream: may use the reserved share
    exempt: bool  # a trusted upstream: no per-client count or rate limit
    # Called with "shed" (close the session with 421 4.7.0) or "stress" (re-arm the idle
    # timer with the shorter stress timeouts).
    notify: Callable[[str], None]
    idle_since: float | None = None  # waiting for a command since; None while it works
    in_transaction: bool = False  # a MAIL FROM accepted and the transaction not ended
    released: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Refusal:
    reply: str  # "421 4.7.0 ..." without the host name
    rule: str  # the decision line's rule=
    log: bool  # the first of this client's refusals this minute
    unsaid: int  # refusals of this client not logged since the last line


class Admission:
    """Session slots for the whole process; `limits` is [server.limits]."""

    def __init__(self, limits: Limits, *, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.limits = limits
        self.total = 0
        self.reserved_in_use = 0
        self.per_ip: dict[str, int] = {}
        self._attempts: dict[str, list[float]] = {}  # addr -> [unit start, attempts]
        self._pruned = clock()
        self._idle: OrderedDict[Slot, float] = OrderedDict()  # idle strangers, longest first
        self._idle_by_ip: dict[str, OrderedDict[Slot, float]] = {}  # the same, per address
        self._strangers: set[Slot] = set()
        self.stressed_since: float | None = None
        self.shed_count = 0
        self.refused_count = 0
        self._stress_shed = 0
        self._stress_refused = 0
        self.log_once = LogOnce(clock=clock)
        # Whether an address is in a customer's networks (the reserved share); the daemon
        # sets it from the running policy.
        self.is_customer: Callable[[str], bool] = lambda _addr: False

    # ------------------------------------------------------------------ limits

    @property
    def stranger_share(self) -> int:
        lim = self.limits
        return max(0, lim.max_sessions - lim.reserved_sessions)

    @property
    def stressed(self) -> bool:
        return self.stressed_since is not None

    def command_timeout(self, slot: Slot | None) -> float:
        lim = self.limits
        if self.stressed and slot is not None and not slot.reserved:
            return min(lim.command_timeout, lim.stress_command_timeout)
        return lim.command_timeout

    def data_timeout(self, slot: Slot | None) -> float:
        lim = self.limits
        if self.stressed and slot is not None and not slot.reserved:
            return min(lim.data_timeout, lim.stress_data_timeout)
        return lim.data_timeout

    # ------------------------------------------------------------------ connect

    def admit(
        self, addr: str, *, reserved: bool, exempt: bool, notify: Callable[[str], None]
    ) -> Slot | Refusal:
        """A slot for a new connection from `addr`, or why not.

        Making room may shed the longest-idle stranger (its notify("shed") is called
        before this returns).
        """
        lim = self.limits
        now = self.clock()
        if not exempt:
            if self.per_ip.get(addr, 0) >= lim.max_sessions_per_ip:
                return self._refuse(
                    addr,
                    "sessions",
                    f"Too many connections from {addr} (limit {lim.max_sessions_per_ip})",
                )
            # A customer's MTA opens a connection per message: its pace is [ratelimit]'s
            # business, as Postfix exempts $mynetworks (smtpd_client_event_limit_exceptions).
            if lim.max_connection_rate_per_ip and not reserved and self._rate_exceeded(addr, now):
                return self._refuse(
                    addr,
                    "connection-rate",
                    f"Too many connections from {addr} in the last minute "
                    f"(limit {lim.max_connection_rate_per_ip})",
                )
        full = self.total >= lim.max_sessions or (
            not reserved and len(self._strangers) >= self.stranger_share
        )
        if full and not self._shed_one(now, addr, reserved):
            if self.total >= lim.max_sessions:
                reason = f"Too many sessions in progress (limit {lim.max_sessions})"
            else:
                reason = (
                    f"Too many sessions in progress (limit {self.stranger_share} "
                    "for clients outside our customers' networks)"
                )
            refusal = self._refuse(addr, "sessions", reason)
            self._check_stress(now, pressed=True)
            return refusal
        slot = Slot(addr=addr, reserved=reserved, exempt=exempt, notify=notify, idle_since=now)
        self.total += 1
        if not exempt:
            self.per_ip[addr] = self.per_ip.get(addr, 0) + 1
        if reserved:
            self.reserved_in_use += 1
        else:
            self._strangers.add(slot)
            self._set_idle(slot, now)
        self._check_stress(now, pressed=full)
        return slot

    def _rate_exceeded(self, addr: str, now: float) -> bool:
        """anvil's connection rate: attempts (refused ones too) in the client's current
        time unit of RATE_WINDOW seconds, which starts at its first attempt after the last
        unit ended. A count per client, as anvil keeps, not a time per attempt: a crowd
        reconnecting at once would otherwise leave tens of thousands of small objects
        behind, scattered over the heap, that keep the allocator from returning its
        arenas after the load (bench.hostile: RSS after)."""
        if now - self._pruned > RATE_WINDOW or len(self._attempts) >= MAX_TRACKED:
            self._prune(now)
        unit = self._attempts.get(addr)
        if unit is None or now - unit[0] >= RATE_WINDOW:
            self._attempts[addr] = [now, 1]
            return self.limits.max_connection_rate_per_ip < 1
        unit[1] += 1
        return unit[1] > self.limits.max_connection_rate_per_ip

    def _prune(self, now: float) -> None:
        self._pruned = now
        for a in [a for a, (start, _) in self._attempts.items() if now - start >= RATE_WINDOW]:
            del self._attempts[a]
        while len(self._attempts) >= MAX_TRACKED:
            del self._attempts[next(iter(self._attempts))]

    def _refuse(self, addr: str, rule: str, reason: str) -> Refusal:
        self.refused_count += 1
        self._stress_refused += 1
        say, unsaid = self.log_once.say((addr, rule))
        return Refusal(
            reply=f"421 4.7.0 {reason}; try again later", rule=rule, log=say, unsaid=unsaid
        )

    def _shed_one(self, now: float, addr: str, reserved: bool) -> bool:
        """Close an idle stranger to make room for a newcomer from `addr`; False if none
        may be closed (then the newcomer is refused). Never a session idle for less than
        SHED_MIN_IDLE seconds: it is between two commands of a transaction."""
        victim = None
        if reserved:  # customers outrank strangers: the longest idle of all
            victim = self._sheddable(self._idle, now)
        else:
            mine = self.per_ip.get(addr, 0)
            most = mine + 1  # the victim's address must hold at least mine + 2
            for ip, slots in self._idle_by_ip.items():
                held = self.per_ip.get(ip, 0)
                if held > most and (found := self._sheddable(slots, now)) is not None:
                    victim, most = found, held
        if victim is None:
            return False
        notify = victim.notify  # release() unsets it
        self.release(victim)
        self.shed_count += 1
        self._stress_shed += 1
        notify("shed")
        return True

    @staticmethod
    def _sheddable(slots: OrderedDict[Slot, float], now: float) -> Slot | None:
        """The longest-idle slot that may be shed: idle SHED_MIN_IDLE, or outside a
        transaction. A crowd's slots are mostly outside one: the scan stops early."""
        for slot, since in slots.items():
            if now - since >= SHED_MIN_IDLE or not slot.in_transaction:
                return slot
        return None

    def _set_idle(self, slot: Slot, now: float) -> None:
        self._unset_idle(slot)
        self._idle[slot] = now
        self._idle_by_ip.setdefault(slot.addr, OrderedDict())[slot] = now

    def _unset_idle(self, slot: Slot) -> None:
        if self._idle.pop(slot, None) is not None:
            slots = self._idle_by_ip[slot.addr]
            del slots[slot]
            if not slots:
                del self._idle_by_ip[slot.addr]

    # ------------------------------------------------------------------ session life

    def idle(self, slot: Slot, *, in_transaction: bool = False) -> None:
        """The session waits for the client's next command."""
        if slot.released:
            return
        now = self.clock()
        slot.idle_since = now
        slot.in_transaction = in_transaction
        if not slot.reserved:
            self._set_idle(slot, now)

    def busy(self, slot: Slot) -> None:
        """The session works on a command (or reads DATA): never shed while it does."""
        slot.idle_since = None
        self._unset_idle(slot)

    def release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        slot.notify = _released  # never called again; it names the session (a cycle)
        self.total -= 1
        if not slot.exempt:
            n = self.per_ip.get(slot.addr, 0) - 1
            if n > 0:
                self.per_ip[slot.addr] = n
            else:
                self.per_ip.pop(slot.addr, None)
        if slot.reserved:
            self.reserved_in_use -= 1
        self._strangers.discard(slot)
        self._unset_idle(slot)
        self._check_stress(self.clock(), pressed=False)

    # ------------------------------------------------------------------ stress

    def _check_stress(self, now: float, *, pressed: bool) -> None:
        share = self.stranger_share
        strangers = len(self._strangers)
        if self.stressed_since is None:
            if pressed or strangers >= share or self.total >= self.limits.max_sessions:
                self.stressed_since = now
                self._stress_shed = self._stress_refused = 0
                lim = self.limits
                log.warning(
                    "warning: stress: started: sessions=%d/%d strangers=%d/%d; strangers' "
                    "timeouts now command %gs, data %gs, and the longest-idle strangers are "
                    "closed first to make room",
                    self.total,
                    lim.max_sessions,
                    len(self._strangers),
                    share,
                    self.command_timeout(_STRANGER),
                    self.data_timeout(_STRANGER),
                )
                for slot in list(self._idle):
                    slot.notify("stress")
        elif (
            strangers < share * STRESS_END and self.total < self.limits.max_sessions and not pressed
        ):
            log.warning(
                "stress: ended after %ds: sessions=%d/%d; %d idle strangers closed "
                "and %d connections refused meanwhile",
                now - self.stressed_since,
                self.total,
                self.limits.max_sessions,
                self._stress_shed,
                self._stress_refused,
            )
            self.stressed_since = None

    def status(self) -> dict[str, Any]:
        """For `maild status`."""
        lim = self.limits
        return {
            "sessions": self.total,
            "max_sessions": lim.max_sessions,
            "reserved_in_use": self.reserved_in_use,
            "reserved_sessions": lim.reserved_sessions,
            "strangers": len(self._strangers),
            "stress": self.stressed,
            "shed": self.shed_count,
            "refused": self.refused_count,
        }


# What a stranger's timeouts are, for the stress log line.
_STRANGER = Slot(addr="", reserved=False, exempt=False, notify=lambda _e: None)
