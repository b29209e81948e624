"""/metrics: the daemon's own state, in Prometheus text format, read at scrape time.

Nothing here counts on the hot path: the collector reads what the daemon keeps anyway
(Proxy.stats and its decision counts, the session counter, the downstream pool, the
decision log's queue, StoreError.raised, maild.dns.STATS, the opt-in service's fold)
and, once per scrape, a few small GROUP BY queries over tables that grow slowly
(retention runs, mailbox quota states, strikes). Labels are bounded: rule, stage and
action names are fixed in the code; `list` by the registered lists; `customer` by the
[[customers]] of policies.toml; nothing carries an address.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from maild.store.base import StoreError

log = logging.getLogger("maild.web")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_QUERIES = {
    "retention": "SELECT rule, COALESCE(SUM(deleted), 0), COALESCE(SUM(bytes), 0), "
    "COALESCE(SUM(shrunk), 0), COALESCE(SUM(restored), 0), "
    "COALESCE(SUM(errors), 0) FROM retention_runs GROUP BY rule",
    "quota": "SELECT quota_state, COUNT(*) FROM retention_mailboxes GROUP BY quota_state",
    "strikes": "SELECT rule, COUNT(*) FROM strikes GROUP BY rule",
}


async def read_store(store: Any) -> dict[str, list[tuple]] | None:
    """The scrape's store figures, or None when the store does not answer."""
    out: dict[str, list[tuple]] = {}
    try:
        for name, sql in _QUERIES.items():
            out[name] = list(await store.fetchall(sql))
    except StoreError as e:
        log.warning("web: metrics: state store figures left out: %s", e)
        return None
    return out


class MaildCollector(Collector):
    def __init__(self, daemon: Any, stored: dict[str, list[tuple]] | None, web: Any = None):
        self.d = daemon
        self.stored = stored
        self.web = web

    def collect(self) -> Iterator[Metric]:
        yield from self._smtp()
        yield from self._store()
        yield from self._dns()
        yield from self._optin()
        yield from self._sanctions()
        yield from self._retention()
        if self.web is not None:
            c = CounterMetricFamily(
                "maild_web_requests",
                "Web page requests by page and outcome",
                labels=["page", "outcome"],
            )
            for (page, outcome), n in sorted(self.web.outcomes.items()):
                c.add_metric([page, outcome], n)
            yield c

    def _smtp(self) -> Iterator[Metric]:
        d = self.d
        proxy = d.proxy
        for key in ("relayed", "rejected", "tempfailed"):
            yield CounterMetricFamily(
                f"maild_{key}",
                f"SMTP decisions that {key} (per transaction or recipient)",
                value=proxy.stats[key],
            )
        c = CounterMetricFamily(
            "maild_decisions",
            "SMTP decisions by stage, action and rule",
            labels=["stage", "action", "rule"],
        )
        for (stage, action, rule), n in sorted(proxy.decided.items()):
            c.add_metric([stage, action, rule], n)
        yield c
        yield GaugeMetricFamily(
            "maild_sessions_open", "SMTP sessions in flight", value=d.counter.total
        )
        ds = d.downstream
        yield GaugeMetricFamily(
            "maild_downstream_in_use", "Downstream (Postfix) connections in use", value=ds.in_use
        )
        yield GaugeMetricFamily(
            "maild_downstream_idle",
            "Idle downstream connections kept for reuse",
            value=len(ds._idle),
        )
        yield GaugeMetricFamily(
            "maild_decision_log_pending",
            "Decision rows waiting to be written to the state store",
            value=len(d.decisions.pending),
        )
        yield GaugeMetricFamily(
            "maild_start_time_seconds", "When the daemon started (unix time)", value=proxy.started
        )

    def _store(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "maild_store_errors", "State-store errors since start", value=StoreError.raised
        )
        yield GaugeMetricFamily(
            "maild_store_up",
            "1 when this scrape's store queries worked",
            value=0 if self.stored is None else 1,
        )

    def _dns(self) -> Iterator[Metric]:
        from maild import dns

        c = CounterMetricFamily(
            "maild_dns_lookups",
            "DNS lookups sent, by result (error: timeout, SERVFAIL, no resolver)",
            labels=["result"],
        )
        for result in ("ok", "nxdomain", "nodata", "nullmx", "error"):
            c.add_metric([result], dns.STATS.get(result, 0))
        yield c
        yield CounterMetricFamily(
            "maild_dns_cache_hits",
            "DNS questions answered from the cache",
            value=dns.STATS.get("cache-hit", 0),
        )

    def _optin(self) -> Iterator[Metric]:
        from maild.optin.model import Kind, State

        svc = getattr(self.d, "optin", None)
        if svc is None:
            return
        c = CounterMetricFamily(
            "maild_consent_events", "Consent ledger events by kind", labels=["kind"]
        )
        for k in Kind:
            c.add_metric([k.value], svc.kinds.get(k, 0))
        yield c
        counts: dict[tuple[str, str], int] = {}
        for (list_id, _), st in svc.standings.items():
            counts[(list_id, st.state.value)] = counts.get((list_id, st.state.value), 0) + 1
        g = GaugeMetricFamily(
            "maild_consent_subscribers",
            "Addresses per registered list and state",
            labels=["list", "state"],
        )
        for list_id in sorted(svc.registry().lists):
            for s in State:
                if s is not State.UNKNOWN:
                    g.add_metric([list_id, s.value], counts.get((list_id, s.value), 0))
        yield g

    def _sanctions(self) -> Iterator[Metric]:
        sanctions = getattr(self.d, "sanctions", None)
        if sanctions is not None:
            g = GaugeMetricFamily(
                "maild_customer_blocked",
                "1 for a customer blocked by sanctions (one series per [[customers]] entry)",
                labels=["customer"],
            )
            names = sorted({c.name for c in self.d.config.customers} | set(sanctions.blocked))
            for name in names:
                g.add_metric([name], 1 if name in sanctions.blocked else 0)
            yield g
        if self.stored is not None:
            c = CounterMetricFamily(
                "maild_strikes", "Strikes recorded against customers, by rule", labels=["rule"]
            )
            for rule, n in self.stored["strikes"]:
                c.add_metric([str(rule)], int(n))
            yield c

    def _retention(self) -> Iterator[Metric]:
        if self.stored is None:
            return
        deleted = CounterMetricFamily(
            "maild_retention_deleted", "Messages deleted by retention rules", labels=["rule"]
        )
        size = CounterMetricFamily(
            "maild_retention_deleted_bytes", "Bytes deleted by retention rules", labels=["rule"]
        )
        quota = CounterMetricFamily(
            "maild_retention_quota_changes",
            "Mailbox quotas shrunk or restored by retention rules",
            labels=["rule", "change"],
        )
        errors = CounterMetricFamily(
            "maild_retention_errors", "Errors in retention runs", labels=["rule"]
        )
        for rule, n, b, shrunk, restored, err in self.stored["retention"]:
            deleted.add_metric([rule], int(n))
            size.add_metric([rule], int(b))
            quota.add_metric([rule, "shrunk"], int(shrunk))
            quota.add_metric([rule, "restored"], int(restored))
            errors.add_metric([rule], int(err))
        yield from (deleted, size, quota, errors)
        g = GaugeMetricFamily(
            "maild_retention_mailboxes", "Mailboxes by quota state", labels=["quota_state"]
        )
        for state, n in self.stored["quota"]:
            g.add_metric([str(state)], int(n))
        yield g


async def exposition(daemon: Any, web: Any = None) -> bytes:
    """One scrape: the store figures first (async), then the text format."""
    stored = await read_store(daemon.store)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MaildCollector(daemon, stored, web))
    return generate_latest(registry)
