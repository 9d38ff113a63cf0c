"""`outbox run --metrics-port`: Prometheus metrics that move with the work, and a health endpoint."""

from __future__ import annotations

import signal
import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from processor.database import DatabaseUrl, connect
from tests.fix_database import subprocess_env
from tests.helpers import WorkerProcess, consumer_os_pid, finish_jobs, pending_work, wait_for

PASSWORD = "s3cr3t@#:/pw"  # the local server trusts 127.0.0.1, so any password connects


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> tuple[dict[str, float], str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:  # summed over labels (job state changes come by to_status)
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values, text


def test_metrics_move_with_the_work_and_health_answers(db, engine, tmp_path):
    port = free_port()
    with_password = DatabaseUrl(db.url.set(password=PASSWORD))
    worker = WorkerProcess(subprocess_env(with_password, OUTBOX_METRICS_PORT=str(port)), tmp_path / "worker.log")
    try:
        with connect(db, application_name="observer") as conn:
            wait_for(lambda: consumer_os_pid(conn) == worker.pid, what="the worker to start")
            health = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            assert health.status == 200

            # The gauge is set once the worker has checked the partition it locked, a moment after
            # the lock shows in the database.
            def consuming() -> tuple[dict[str, float], str] | None:
                metrics = scrape(port)
                return metrics if metrics[0].get("outbox_active_consumer") == 1 else None

            before, _ = wait_for(consuming, what="the active-consumer gauge")
            finish_jobs(engine, 10)  # 10 jobs x 2 variants x 2 events
            wait_for(lambda: pending_work(conn) == 0, what="the worker to apply")

            def moved() -> tuple[dict[str, float], str] | None:
                values, text = scrape(port)
                applied = values.get("outbox_events_applied_total", 0) - before.get("outbox_events_applied_total", 0)
                return (values, text) if applied >= 40 else None

            after, text = wait_for(moved, what="the counters to move")
        assert after["outbox_events_applied_total"] - before.get("outbox_events_applied_total", 0) == 40
        assert after["outbox_batches_total"] >= 1
        assert after["outbox_batch_duration_seconds_count"] == after["outbox_batches_total"]
        assert after["outbox_job_state_changes_total"] >= 10
        assert "outbox_lag_seconds" in after and "outbox_pending_events" in after and "outbox_dead_letters" in after
        for form in (PASSWORD, "s3cr3t"):
            assert form not in text and form not in worker.output()
        print(
            f"\nmetrics: {after['outbox_events_applied_total']:.0f} events in {after['outbox_batches_total']:.0f} "
            f"batches, lag {after['outbox_lag_seconds']:.3f} s; /health 200; no password in /metrics or the log"
        )
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
