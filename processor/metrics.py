"""Prometheus metrics and a health endpoint for `outbox run --metrics-port N` (and WorkerService).

Two kinds, by who computes them:

- each worker, about itself: counters and the batch histogram move with every batch it commits
  (``on_batch``), the lag of the partitions it consumes, whether it consumes them, what its schema
  check found (every standby interval), its build;
- one worker for all of them: the gauges that scan pending work (pending events and their age, dead
  letters, flagged jobs, subscriptions, the oldest open transaction that wrote events). Every
  worker's refresh thread stands, on a connection of its own, for the election of that duty
  (processor/election.py, store.ClusterDuty.METRICS_SCAN); the one elected reads them every few seconds,
  the others export none of them (no stale copy), and take over within one interval when the
  elected one's session ends.
  Dashboards and alerts take ``max`` over the workers.

`outbox healthcheck` and a container's HEALTHCHECK ask /health through processor.probe.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily

from processor import store, testsignal
from processor.batch import BatchResult
from processor.database import DatabaseUrl, connect, redact
from processor.decode import DeadLetterClass
from processor.election import Election
from processor.schema_check import SchemaReport
from processor.store import ClusterDuty, Connection, SubscriptionInfo
from processor.subscriptions import list_subscriptions
from processor.testsignal import Signal

log = logging.getLogger(__name__)


def product_version() -> str:
    try:
        return version("pg-outbox-processor")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.refreshed = threading.Event()  # set after each pass of refresh_from_database (tests wait on it)
        labels = ["partition"]
        r = self.registry

        # This worker's own.
        self.build_info = Gauge("outbox_build_info", "Always 1; the version in a label.", ["version"], registry=r)
        self.build_info.labels(product_version()).set(1)
        self.events_applied = Counter("outbox_events_applied", "Events applied to job state.", labels, registry=r)
        self.batches = Counter("outbox_batches", "Batches committed.", labels, registry=r)
        self.jobs_changed = Counter(
            "outbox_job_state_changes",
            "Job states changed (status or current step), by the status the job was given.",
            [*labels, "to_status"],
            registry=r,
        )
        self.batch_duration = Histogram(
            "outbox_batch_duration_seconds",
            "Time from reading a batch to its commit.",
            labels,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.lag = Gauge(
            "outbox_lag_seconds",
            "Age of the oldest event of the last batch when it committed (0 when caught up); exported by "
            "the partition's consumer.",
            labels,
            registry=r,
        )
        self.active = Gauge(
            "outbox_active_consumer",
            "1 while this worker is the partition's consumer (lock held, checks done).",
            labels,
            registry=r,
        )
        self.schema_problems = Gauge(
            "outbox_schema_problems",
            "Problems with the schema this worker found at its last check (a product trigger missing or "
            "disabled, a legacy writer of job state); 0 when all is in place.",
            registry=r,
        )
        self.capture_trigger = Gauge(
            "outbox_capture_trigger_enabled",
            "1 while the capture trigger is present and enabled on jobs_variants, else 0 (this worker's last "
            "schema check; `outbox migrate` restores it).",
            ["trigger"],
            registry=r,
        )
        self.metrics_scanner = Gauge(
            "outbox_metrics_scanner",
            "1 while this worker computes the gauges that scan pending work (one worker does), else 0.",
            registry=r,
        )
        self.partitions = Gauge("outbox_partitions", "The partition count (outbox repartition).", registry=r)

        # Scanned by one worker (see the module's docstring): exported from the last scan, while it holds.
        self.scanned = ScannedGauges()
        self._writers = WriterClock()  # the scans' view of open transactions that wrote events
        self.registry.register(self.scanned)

    # ----- this worker's own (called from the worker's thread)

    def on_batch(self, result: BatchResult, seconds: float) -> None:
        p = str(result.partition)
        self.events_applied.labels(p).inc(result.events)
        self.batches.labels(p).inc()
        self.on_jobs_changed(result.partition, result.job_statuses)
        self.batch_duration.labels(p).observe(seconds)
        self.lag.labels(p).set(max(result.latencies, default=0.0))

    def on_jobs_changed(self, partition: int, statuses: Sequence[str]) -> None:
        """Count job state changes by the status each job was given (a batch's, or a refold's)."""
        if statuses:
            p = str(partition)
            for status, n in collections.Counter(statuses).items():
                self.jobs_changed.labels(p, status).inc(n)

    def caught_up(self, partition: int) -> None:
        """The consumer found nothing to apply: no lag."""
        self.lag.labels(str(partition)).set(0)

    def set_active(self, partition: int, active: bool) -> None:
        self.active.labels(str(partition)).set(1 if active else 0)
        if not active:  # the lag of a partition is its consumer's to tell
            with contextlib.suppress(KeyError):
                self.lag.remove(str(partition))

    def on_schema_check(self, report: SchemaReport) -> None:
        self.schema_problems.set(len(report.problems()))
        for trigger, enabled in report.capture_enabled().items():
            self.capture_trigger.labels(trigger).set(1 if enabled else 0)

    # ----- scanned by one worker (the refresh thread)

    def refresh_from_database(self, db: DatabaseUrl, stop: threading.Event, every: float = 5.0) -> None:
        """Every ``every`` seconds until ``stop``: the partition count, and the scanned gauges while this
        worker is elected to scan (run in a thread, on a connection of its own)."""
        conn: Connection | None = None
        election = Election(ClusterDuty.METRICS_SCAN)
        scanning = failing = False
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect(db, application_name="outbox-metrics")
                scanning = election.holds(conn)
                self.partitions.set(store.partitions_get(conn))
                self.scanned.scan = scan(conn, self._writers) if scanning else None
                failing = False
            except Exception as exc:  # the database may be away; the worker reports that itself
                # Once per run of failures (a scan that always fails, lacking a grant, would else be silent:
                # the OutboxMetricsScanMissing alert and this line say it).
                (log.debug if failing else log.warning)(
                    "metrics refresh failed: %s", redact(str(exc).strip().split("\n")[0] or type(exc).__name__, db)
                )
                failing = True
                if conn is not None:
                    conn.close()
                conn = None
                election.forget()
                scanning = False
                self.scanned.scan = None
            self.metrics_scanner.set(1 if scanning else 0)
            self.refreshed.set()
            if scanning and conn is not None:
                session = conn.info.backend_pid
                testsignal.emit(Signal.CLUSTER_DUTY_DONE, duty=ClusterDuty.METRICS_SCAN, session=session, scanner=self)
            stop.wait(every)
        if conn is not None:
            conn.close()
        self.scanned.scan = None
        self.metrics_scanner.set(0)


@dataclass(frozen=True, slots=True)
class Scan:
    """The gauges that scan pending work, read at once by the worker that holds the metrics lock."""

    pending: dict[int, int]  # by partition
    oldest_pending_age: dict[int, float]  # seconds, by partition (0: nothing pending)
    dead_letters: dict[DeadLetterClass, int]  # every class, 0 included
    flagged_jobs: int
    oldest_open_writer_age: float  # seconds (0: none)
    subscriptions: list[SubscriptionInfo]


class WriterClock:
    """How long each open transaction that wrote events has been open, even when its start is hidden.

    Without pg_read_all_stats a login does not see when another login's transaction began: such a
    transaction is counted from when a scan first saw it (a lower bound, never "none open").
    """

    def __init__(self) -> None:
        self._first_seen: dict[str, float] = {}

    def oldest_age(self, writers: dict[str, float | None]) -> float:
        now = time.monotonic()
        self._first_seen = {xid: self._first_seen.get(xid, now) for xid in writers}
        return max((now - self._first_seen[xid] if age is None else age for xid, age in writers.items()), default=0.0)


def scan(conn: Connection, writers: WriterClock | None = None) -> Scan:
    # Every partition's, not only this worker's: the whole backlog, in one consistent view.
    with store.one_snapshot(conn):
        summaries = {p: store.events_pending_summary(conn, p, top=0) for p in range(store.partitions_get(conn))}
        dead = store.dead_letters_count_by_class(conn)
        flagged = store.job_flags_count(conn)
        subscriptions = list_subscriptions(conn)
    return Scan(
        pending={p: s.count for p, s in summaries.items()},
        oldest_pending_age={p: s.oldest_age_seconds or 0.0 for p, s in summaries.items()},
        dead_letters=dead,
        flagged_jobs=flagged,
        # pg_locks: now, not in the snapshot
        oldest_open_writer_age=(writers or WriterClock()).oldest_age(store.event_writers_list(conn)),
        subscriptions=subscriptions,
    )


class ScannedGauges:
    """A collector of the last ``Scan`` (replaced whole by the refresh thread): None exports no sample."""

    def __init__(self) -> None:
        self.scan: Scan | None = None

    def describe(self) -> list[GaugeMetricFamily]:
        return self._families(None)

    def collect(self) -> list[GaugeMetricFamily]:
        return self._families(self.scan)

    @staticmethod
    def _families(scan: Scan | None) -> list[GaugeMetricFamily]:
        pending = GaugeMetricFamily("outbox_pending_events", "Committed events not applied yet.", labels=["partition"])
        oldest = GaugeMetricFamily(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest pending work of the partition (an event not applied, or a job waiting to be "
            "folded); 0 when there is none.",
            labels=["partition"],
        )
        dead = GaugeMetricFamily(
            "outbox_dead_letters",
            "Dead letters waiting for retry or discard, by the class of their reason (processor.decode).",
            labels=["reason"],
        )
        flagged = GaugeMetricFamily(
            "outbox_flagged_jobs", "Jobs flagged in outbox_job_flags (their state is left as it was)."
        )
        writer = GaugeMetricFamily(
            "outbox_oldest_open_transaction_age_seconds",
            "Age of the oldest open transaction that wrote outbox events: they wait for its commit (0: none).",
        )
        lag = GaugeMetricFamily(
            "outbox_subscription_lag_transitions",
            "Job transitions after a subscription's position that pass its filter (not acknowledged yet).",
            labels=["subscription"],
        )
        parked = GaugeMetricFamily(
            "outbox_subscription_parked_transitions",
            "Transitions a subscription's handler gave up on (`outbox subscriptions failures NAME`).",
            labels=["subscription"],
        )
        if scan is not None:
            for partition, count in scan.pending.items():
                pending.add_metric([str(partition)], count)
            for partition, age in scan.oldest_pending_age.items():
                oldest.add_metric([str(partition)], age)
            for kind, count in scan.dead_letters.items():
                dead.add_metric([str(kind)], count)
            flagged.add_metric([], scan.flagged_jobs)
            writer.add_metric([], scan.oldest_open_writer_age)
            for info in scan.subscriptions:
                lag.add_metric([info.name], info.lag)
                parked.add_metric([info.name], info.parked)
        return [pending, oldest, dead, flagged, writer, lag, parked]


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
