"""``/ready`` and ``/metrics``: whether this deployment propagates revocations, measured as progress.

Both read the same figures (``Figures.gather``): the database's own answers (writable? how old is the oldest
unpublished event? how many events wait for the audit seal?), the background leader's counters, and this
process's freshness proof (freshness.py), whose age covers the whole path from the log to the caches.

``/ready`` is 503 with its reasons when any of these holds, 200 again as soon as none does:

* the database is not writable (a standby, a failover in progress) or does not answer;
* NATS is not connected from this process;
* this process has no freshness proof younger than ``READY_MAX_LAG_S``: the checkpoints that ride behind the
  events did not come back, whatever the reason (no leader, a leader cut from NATS, a stalled projection,
  a missing stream);
* the oldest event still in the outbox was recorded more than ``READY_MAX_LAG_S`` ago.

``/health`` stays liveness: the process and its database answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..storage.store import APPENDED

if TYPE_CHECKING:
    from ..background.runtime import Runtime

READY_MAX_LAG_S = 3.0

# One statement, one round trip: writability, the outbox, the audit seal.
DATABASE_FIGURES = """
SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::boolean,
       (SELECT count(*) FROM outbox),
       (SELECT extract(epoch FROM clock_timestamp() - e.recorded_at)
        FROM events e WHERE e.position = (SELECT min(position) FROM outbox)),
       (SELECT count(*) FROM events
        WHERE position > coalesce((SELECT max(position) FROM event_chain), 0))
"""
# Routes as label values: the fixed paths we serve, anything else is "other" (bounded cardinality).
KNOWN_ROUTES = frozenset({
    "/api/auth/api-key/create", "/api/auth/api-key/get", "/api/auth/api-key/list", "/api/auth/api-key/update",
    "/api/auth/api-key/delete", "/api/auth/api-key/rotate", "/api/auth/api-key/verify",
    "/api/auth/api-key/history", "/api/auth/api-key/revocation", "/health", "/ready", "/metrics", "/openapi.json",
})


@dataclass
class Figures:
    database_ok: bool = False
    read_only: bool = False
    outbox_depth: float = math.nan
    outbox_oldest_age: float = 0.0
    unsealed: float = math.nan
    nats_connected: bool = False
    checkpoint_age: float = math.inf
    leader: bool = False
    consumer_pending: dict[str, float] = field(default_factory=dict)
    # The receipts projection's (leader only; 0 elsewhere): receipts taken in, revocations announced in effect
    # everywhere, caches live, revocations waiting for a cache's receipt and the oldest one's wait.
    receipts_received: float = 0.0
    revocations_effective: float = 0.0
    caches_live: float = 0.0
    revocations_waiting: float = 0.0
    oldest_waiting_s: float = 0.0

    @classmethod
    async def gather(cls, runtime: "Runtime") -> "Figures":
        figures = cls(nats_connected=runtime.bus.connected, checkpoint_age=runtime.freshness.age(),
                      leader=runtime.leader)
        try:
            async with runtime.pool.connection(timeout=2.0) as conn:
                row = await (await conn.execute(DATABASE_FIGURES)).fetchone()
        except Exception:
            return figures
        figures.database_ok = True
        figures.read_only, figures.outbox_depth, oldest, figures.unsealed = row[0], row[1], row[2], row[3]
        figures.outbox_oldest_age = float(oldest or 0.0)
        if runtime.leader and runtime.invalidations is not None:
            figures.consumer_pending["invalidations"] = runtime.invalidations.pending
        if runtime.leader and runtime.receipts is not None:
            receipts = runtime.receipts
            figures.receipts_received, figures.revocations_effective = receipts.received, receipts.completed
            figures.caches_live, figures.revocations_waiting, figures.oldest_waiting_s = receipts.gauges()
        return figures

    def reasons(self) -> list[str]:
        """Why this deployment cannot be trusted to propagate right now (empty: ready)."""
        out = []
        if not self.database_ok:
            out.append("the database does not answer")
        elif self.read_only:
            out.append("the database is read-only (a standby, or a failover in progress)")
        if not self.nats_connected:
            out.append("NATS is not connected")
        if self.checkpoint_age > READY_MAX_LAG_S:
            age = "never" if math.isinf(self.checkpoint_age) else f"{self.checkpoint_age:.1f}s ago"
            out.append(f"no freshness checkpoint came back within {READY_MAX_LAG_S:g}s (last: {age}): "
                       "propagation is stalled")
        if self.outbox_oldest_age > READY_MAX_LAG_S:
            out.append(f"the oldest unpublished event is {self.outbox_oldest_age:.1f}s old")
        return out


class Metrics:
    """The process's Prometheus registry: HTTP counters kept by ``middleware``, the rest read at scrape."""

    def __init__(self, runtime: "Runtime") -> None:
        self.runtime = runtime
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("keyledger_http_requests", "HTTP requests answered", ("route", "status"),
                                registry=self.registry)
        self.duration = Histogram("keyledger_http_request_duration_seconds", "HTTP request duration", ("route",),
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
                                  registry=self.registry)
        self._figures = Figures()
        self.registry.register(_RuntimeCollector(self))

    async def render(self) -> bytes:
        self._figures = await Figures.gather(self.runtime)
        return generate_latest(self.registry)

    def middleware(self, app: Any) -> Any:
        """ASGI middleware counting every HTTP answer by route and status."""
        # The labelled children, looked up once per (route, status): ``labels()`` takes a lock and builds a key
        # on every call, a visible share of a request's CPU under load.
        counters: dict[tuple[str, int], Any] = {}
        histograms: dict[str, Any] = {}

        def count(route: str, status: int, seconds: float) -> None:
            counter = counters.get((route, status))
            if counter is None:
                counter = counters[(route, status)] = self.requests.labels(route, str(status))
            counter.inc()
            histogram = histograms.get(route)
            if histogram is None:
                histogram = histograms[route] = self.duration.labels(route)
            histogram.observe(seconds)

        async def counted(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
            started = time.perf_counter()
            status = 500

            async def send_counted(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_counted)
            finally:
                count(route, status, time.perf_counter() - started)

        return counted


class _RuntimeCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        runtime, figures = self.metrics.runtime, self.metrics._figures
        appended = CounterMetricFamily("keyledger_events_appended", "Events appended by this process",
                                       labels=("type",))
        for event_type, count in sorted(APPENDED.items()):
            appended.add_metric((event_type,), count)
        yield appended
        yield _gauge("keyledger_outbox_depth", "Events not yet acknowledged by JetStream", figures.outbox_depth)
        yield _gauge("keyledger_outbox_oldest_age_seconds", "Age of the oldest event in the outbox",
                     figures.outbox_oldest_age)
        yield CounterMetricFamily("keyledger_relay_published", "Events this process's relay published",
                                  value=runtime.relay.published)
        yield CounterMetricFamily("keyledger_relay_reduced", "Events published in reduced form (too large)",
                                  value=runtime.relay.reduced)
        yield CounterMetricFamily("keyledger_relay_checkpoints", "Freshness checkpoints this process published",
                                  value=runtime.relay.checkpoints)
        yield _gauge("keyledger_checkpoint_age_seconds",
                     "Age of this process's freshness proof (+Inf: none yet)", figures.checkpoint_age)
        # One durable consumer feeds the three projections (subscriber.py): its backlog is the invalidations'.
        pending = GaugeMetricFamily("keyledger_consumer_pending", "Messages a projection's consumer has not "
                                    "acknowledged (leader only)", labels=("projection",))
        for name, value in figures.consumer_pending.items():
            pending.add_metric((name,), value)
        yield pending
        yield CounterMetricFamily("keyledger_receipts_received", "Cache receipts taken in (leader)",
                                  value=figures.receipts_received)
        yield CounterMetricFamily("keyledger_revocations_effective", "Revocations announced in effect everywhere "
                                  "(leader)", value=figures.revocations_effective)
        yield _gauge("keyledger_receipt_caches_live", "Caches heard within the gone bound (leader)",
                     figures.caches_live)
        yield _gauge("keyledger_revocations_waiting", "Revocations waiting for a live cache's receipt (leader)",
                     figures.revocations_waiting)
        yield _gauge("keyledger_revocation_oldest_waiting_seconds", "How long the oldest of those has waited "
                     "(leader)", figures.oldest_waiting_s)
        yield _gauge("keyledger_audit_unsealed_events", "Events not yet in the audit hash chain", figures.unsealed)
        yield _gauge("keyledger_leader", "1 in the process that runs the background work", float(figures.leader))
        yield _gauge("keyledger_ready", "1 when /ready answers 200", float(not figures.reasons()))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
