"""Prometheus metrics and a health endpoint for `outbox run --metrics-port N`.

Counters and the batch histogram move with every batch the worker commits (Worker.on_batch);
pending events and dead letters are read from the database every few seconds on a connection of
their own, so a slow count never delays the worker. `outbox healthcheck` and a container's
HEALTHCHECK ask /health through processor.probe.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from processor import store
from processor.batch import BatchResult
from processor.database import DatabaseUrl, connect
from processor.store import QUERIES
from processor.subscriptions import SubscriptionInfo, list_subscriptions

log = logging.getLogger(__name__)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._reported: set[int] = set()  # partitions with a pending-events value
        labels = ["partition"]
        self.events_applied = Counter(
            "outbox_events_applied", "Events applied to job state.", labels, registry=self.registry
        )
        self.batches = Counter("outbox_batches", "Batches committed.", labels, registry=self.registry)
        self.jobs_changed = Counter("outbox_job_state_changes", "Job states changed.", labels, registry=self.registry)
        self.batch_duration = Histogram(
            "outbox_batch_duration_seconds",
            "Time from reading a batch to its commit.",
            labels,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.lag = Gauge(
            "outbox_lag_seconds",
            "Age of the oldest event of the last batch when it committed (0 when caught up).",
            labels,
            registry=self.registry,
        )
        self.pending = Gauge(
            "outbox_pending_events", "Committed events not applied yet.", labels, registry=self.registry
        )
        self.dead_letters = Gauge(
            "outbox_dead_letters", "Dead letters waiting for retry or discard.", registry=self.registry
        )
        self.schema_problems = Gauge(
            "outbox_schema_problems",
            "Problems with the schema this worker found at its last check (a product trigger missing or "
            "disabled, a legacy writer of job state); 0 when all is in place.",
            registry=self.registry,
        )
        self.subscription_lag = Gauge(
            "outbox_subscription_lag_transitions",
            "Job transitions after a subscription's position that pass its filter (not acknowledged yet).",
            ["subscription"],
            registry=self.registry,
        )
        self.subscription_parked = Gauge(
            "outbox_subscription_parked_transitions",
            "Transitions a subscription's handler gave up on (`outbox subscriptions failures NAME`).",
            ["subscription"],
            registry=self.registry,
        )
        self.active = Gauge(
            "outbox_active_consumer",
            "1 while this worker is the partition's consumer (lock held, checks done).",
            labels,
            registry=self.registry,
        )

    def on_batch(self, result: BatchResult, seconds: float) -> None:
        p = str(result.partition)
        self.events_applied.labels(p).inc(result.events)
        self.batches.labels(p).inc()
        self.jobs_changed.labels(p).inc(result.jobs_changed)
        self.batch_duration.labels(p).observe(seconds)
        self.lag.labels(p).set(max(result.latencies, default=0.0))

    def set_active(self, partition: int, active: bool) -> None:
        self.active.labels(str(partition)).set(1 if active else 0)

    def refresh_from_database(self, db: DatabaseUrl, stop: threading.Event, every: float = 5.0) -> None:
        """Keep pending events and dead letters current until ``stop`` (run in a thread)."""
        conn = None
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect(db, application_name="outbox-metrics")
                # Every partition's, not only this worker's: any worker's /metrics shows the whole backlog.
                with store.one_snapshot(conn):
                    counts = {
                        p: store.events_pending_summary(conn, p, top=0).count for p in range(store.partitions_get(conn))
                    }
                for partition in self._reported - set(counts):  # removed by a repartition
                    for gauge in (self.pending, self.lag):
                        with contextlib.suppress(KeyError):
                            gauge.remove(str(partition))
                self._reported = set(counts)
                for partition, pending in counts.items():
                    self.pending.labels(str(partition)).set(pending)
                    if pending == 0:
                        self.lag.labels(str(partition)).set(0)
                row = conn.execute(QUERIES["dead_letters_count"]).fetchone()
                self.dead_letters.set(row[0] if row else 0)
                self._refresh_subscriptions(list_subscriptions(conn))
            except Exception as exc:  # the database may be away; the worker reports that itself
                log.debug("metrics refresh failed: %s", type(exc).__name__)
                if conn is not None:
                    conn.close()
                conn = None
            stop.wait(every)
        if conn is not None:
            conn.close()

    def _refresh_subscriptions(self, found: list[SubscriptionInfo]) -> None:
        names = {info.name for info in found}
        for gauge in (self.subscription_lag, self.subscription_parked):
            for (name,) in list(gauge._metrics):
                if name not in names:
                    gauge.remove(name)
        for info in found:
            self.subscription_lag.labels(info.name).set(info.lag)
            self.subscription_parked.labels(info.name).set(info.parked)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class HealthReport(Protocol):
    """What /health answers from (processor.service.WorkerHealth, which owns the rule)."""

    @property
    def ok(self) -> bool: ...

    @property
    def problems(self) -> Sequence[str]: ...


def serve(metrics: WorkerMetrics, port: int, health: Callable[[], HealthReport]) -> WSGIServer:
    """Serve /metrics (Prometheus) and /health: 200 "ok" while ``health()`` is ok, else 503 and its problems."""
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/health":
            report = health()
            start_response("200 OK" if report.ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if report.ok else "".join(f"{line}\n" for line in report.problems).encode()]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    server = make_server("", port, app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="outbox-metrics-http", daemon=True).start()
    return server
