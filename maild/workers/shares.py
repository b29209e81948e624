"""Each worker's exact share of the host's capacity limits.

[server.limits] is for the host: an operator who writes `max_sessions = 500` expects 500
sessions on it, whatever `workers` says. A worker's share is `limit // N`, the first
`limit % N` workers one more, so the shares add up to the limit exactly and are never
above it. A per-client limit (max_sessions_per_ip, the connection rate, a stranger's
downstream connections) is shared the same way, but at least 1, so a worker never
refuses a client's first connection; then N workers may admit up to N of a client
whose limit is below N.

Why shares and not one admission control in the supervisor: admission is asked at every
connect, before the greeting; a round trip to the supervisor there would put it on
every connection's path, and closing a session in another worker to make room (shed the
longest-idle stranger) would need the supervisor to order a worker to close it and wait.
With shares each worker decides at once, as with one process. The cost: a worker whose
share is full refuses (or sheds) while another may have room. Workers accept one
connection per wake-up (maild.workers.worker.Acceptor), and the kernel wakes every
worker waiting on the shared socket, so the least busy one tends to take it; shares stay
near even.
"""

from __future__ import annotations

from dataclasses import replace

from maild.config import Limits

HOST_WIDE = (
    "max_sessions",
    "reserved_sessions",
    "memory_in_flight",
    "downstream_connections",
    "downstream_reserved",
)
PER_CLIENT = (
    "max_sessions_per_ip",
    "max_connection_rate_per_ip",
    "downstream_connections_per_client",
)


def share(total: int, index: int, workers: int, *, floor: int = 0) -> int:
    """Worker index's part of total (0 stays 0: "no limit" for the connection rate)."""
    if total == 0:
        return 0
    part = total // workers + (1 if index < total % workers else 0)
    return max(part, floor)


def limits_share(lim: Limits, index: int, workers: int) -> Limits:
    if workers <= 1:
        return lim
    values = {k: share(getattr(lim, k), index, workers) for k in HOST_WIDE}
    values |= {k: share(getattr(lim, k), index, workers, floor=1) for k in PER_CLIENT}
    # What config.py checks for the whole stays true of each part.
    values["max_sessions"] = max(values["max_sessions"], 1)
    values["reserved_sessions"] = min(values["reserved_sessions"], values["max_sessions"] - 1)
    values["downstream_connections"] = max(values["downstream_connections"], 1)
    values["downstream_reserved"] = min(
        values["downstream_reserved"], values["downstream_connections"] - 1
    )
    values["spool_threshold"] = min(lim.spool_threshold, values["memory_in_flight"])
    return replace(lim, **values)


def pool_share(pool: int, index: int, workers: int) -> int:
    """Idle downstream connections kept: the host's downstream_pool, shared."""
    return share(pool, index, workers) if workers > 1 else pool
