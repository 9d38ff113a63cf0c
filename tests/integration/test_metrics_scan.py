"""processor.metrics: what an alert reads. One worker scans pending work (the metrics lock), the others
export none of it; dead letters by reason class, flagged jobs, the oldest open transaction that wrote
events, capture triggers, job state changes by to_status, build info."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import outbox
from processor import schema_check
from processor.database import DatabaseUrl, connect
from processor.decode import DeadLetterClass
from processor.metrics import WorkerMetrics, product_version
from processor.store import ClusterDuty
from processor.testsignal import Signal, Signals
from processor.worker import Worker
from tests.fix_database import make_settings
from tests.helpers import drain, finish_jobs, wait_for

INSERT_EVENT = (
    "INSERT INTO outbox_events (event_type, schema_version, job_id, variant_id, variant_version, payload) "
    "VALUES (%s, %s, %s, %s, nextval('outbox_variant_versions'), %s::jsonb)"
)


@contextlib.contextmanager
def refreshing(metrics: WorkerMetrics, db: DatabaseUrl, every: float = 0.05) -> Iterator[threading.Event]:
    """The worker's metrics refresh thread, fast; stopping it closes its connection (and its lock)."""
    stop = threading.Event()
    metrics.refreshed.clear()
    thread = threading.Thread(target=metrics.refresh_from_database, args=(db, stop, every), daemon=True)
    thread.start()
    try:
        assert metrics.refreshed.wait(30), "no refresh pass"
        yield stop
    finally:
        stop.set()
        thread.join(30)


def scans(signals: Signals, metrics: WorkerMetrics, count: int = 1) -> Any:
    """Expect ``count`` passes of ``metrics``' refresh that scanned (it holds the election)."""
    return signals.expect(Signal.CLUSTER_DUTY_DONE, duty=ClusterDuty.METRICS_SCAN, scanner=metrics, count=count)


def value(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def fresh(metrics: WorkerMetrics) -> None:
    """Wait for a pass that began after now."""
    for _ in range(2):
        metrics.refreshed.clear()
        assert metrics.refreshed.wait(30), "no refresh pass"


def test_one_worker_scans_the_others_export_none_and_one_takes_over(db, engine, signals):
    finish_jobs(engine, 2)  # pending events to count
    first, second = WorkerMetrics(), WorkerMetrics()
    with scans(signals, first) as first_scanned, refreshing(first, db) as stop_first:
        first_scanned.wait()
        assert value(first, "outbox_metrics_scanner") == 1
        with refreshing(second, db):
            fresh(second)
            assert value(second, "outbox_metrics_scanner") == 0
            assert value(first, "outbox_pending_events", partition="0") == 8
            assert value(first, "outbox_flagged_jobs") == 0
            for name in ("outbox_pending_events", "outbox_oldest_pending_age_seconds"):
                assert value(second, name, partition="0") is None, name
            for name in ("outbox_flagged_jobs", "outbox_oldest_open_transaction_age_seconds"):
                assert value(second, name) is None, name
            assert value(second, "outbox_dead_letters", reason="other") is None
            assert value(second, "outbox_partitions") == 1  # not a scan: every worker tells it

            with scans(signals, second) as second_scanned:
                stop_first.set()  # its connection closes, and the lock with it
            second_scanned.wait()  # the second took over
            assert value(second, "outbox_metrics_scanner") == 1
            assert value(second, "outbox_pending_events", partition="0") == 8
            wait_for(lambda: value(first, "outbox_metrics_scanner") == 0, what="the first to stop")
            assert value(first, "outbox_pending_events", partition="0") is None  # no stale copy


def test_dead_letters_by_reason_class_and_flagged_jobs(db, conn, engine, settings, signals):
    with engine.begin() as sa:
        job, (variant, other) = outbox.create_job(sa, variants=2)
        step_job, (stepped,) = outbox.create_job(sa, variants=1)
    conn.execute(INSERT_EVENT, ["variant_changed", 1, job, variant, '{"status": "exploded"}'])
    conn.execute(INSERT_EVENT, ["variant_changed", 1, job, other, '{"status": "exploded"}'])
    conn.execute(INSERT_EVENT, ["job_exploded", 1, job, variant, "{}"])
    conn.execute("INSERT INTO outbox_dead_letters (event_id, partition, reason) VALUES (-1, 0, 'written by hand')")
    # A step missing from the pipeline flags its job (through plain SQL: the API would refuse it).
    conn.execute("UPDATE jobs_variants SET status = 'running', current_step = 'mystery' WHERE job_variants_id = %s",
                 [stepped])  # fmt: skip
    drain(settings)
    metrics = WorkerMetrics()
    with scans(signals, metrics) as scanned, refreshing(metrics, db):
        scanned.wait()
        by_class = {kind: value(metrics, "outbox_dead_letters", reason=str(kind)) for kind in DeadLetterClass}
        flagged = value(metrics, "outbox_flagged_jobs")
    assert by_class == {
        **dict.fromkeys(DeadLetterClass, 0.0),
        DeadLetterClass.INVALID_PAYLOAD: 2.0,
        DeadLetterClass.UNKNOWN_TYPE: 1.0,
        DeadLetterClass.OTHER: 1.0,
    }
    assert flagged == 2  # the job with dead letters, and the one with a step the pipeline lacks
    flagged_jobs = {row[0] for row in conn.execute("SELECT job_id FROM outbox_job_flags")}
    assert flagged_jobs == {job, step_job}
    # Python's classification of each stored reason agrees with the query's.
    reasons = [row[0] for row in conn.execute("SELECT reason FROM outbox_dead_letters")]
    assert sorted(str(DeadLetterClass.of(r)) for r in reasons) == sorted(
        ["invalid_payload", "invalid_payload", "unknown_type", "other"]
    )


def test_the_oldest_open_transaction_that_wrote_events(db, conn, engine, signals):
    with engine.begin() as sa:
        _, (variant,) = outbox.create_job(sa, variants=1)
    metrics = WorkerMetrics()
    with (
        connect(db, application_name="writer", autocommit=False) as writer,
        connect(db, application_name="other", autocommit=False) as other,
    ):
        # An open transaction with an id that wrote no event holds nothing back.
        other.execute("CREATE TEMP TABLE t (x int)")
        other.execute("INSERT INTO t VALUES (1)")
        with scans(signals, metrics) as scanned, refreshing(metrics, db):
            scanned.wait()
            assert value(metrics, "outbox_oldest_open_transaction_age_seconds") == 0
            writer.execute("SELECT pg_sleep(0.3)")  # its transaction begins here
            with scans(signals, metrics, count=2) as scanned:  # the second began after the write
                writer.execute("UPDATE jobs_variants SET status = 'running' WHERE job_variants_id = %s", [variant])
            scanned.wait()
            assert (value(metrics, "outbox_oldest_open_transaction_age_seconds") or 0) >= 0.3  # the open writer
            with scans(signals, metrics, count=2) as scanned:
                writer.commit()
            scanned.wait()
            assert value(metrics, "outbox_oldest_open_transaction_age_seconds") == 0  # none open
        other.rollback()


def test_capture_triggers_job_state_changes_by_status_and_build_info(db, conn, engine):
    metrics = WorkerMetrics()
    assert value(metrics, "outbox_build_info", version=product_version()) == 1
    finish_jobs(engine, 4)  # 4 jobs, 2 variants each, created then done
    stats = Worker(make_settings(db), db, metrics=metrics).run(until_idle=True)
    changes = {
        status: value(metrics, "outbox_job_state_changes_total", partition="0", to_status=status)
        for status in ("queued", "running", "done", "failed")
    }
    assert sum(v or 0 for v in changes.values()) == stats.jobs_changed
    assert changes["done"] == 4 and not changes["failed"]
    assert value(metrics, "outbox_lag_seconds", partition="0") is None  # released: the consumer's to tell

    assert value(metrics, "outbox_capture_trigger_enabled", trigger="outbox_capture_variant_update") == 1
    conn.execute("ALTER TABLE jobs_variants DISABLE TRIGGER outbox_capture_variant_update")
    metrics.on_schema_check(schema_check.report(conn))
    assert value(metrics, "outbox_capture_trigger_enabled", trigger="outbox_capture_variant_update") == 0
    assert value(metrics, "outbox_capture_trigger_enabled", trigger="outbox_capture_variant_insert_delete") == 1
    assert value(metrics, "outbox_schema_problems") == 1
