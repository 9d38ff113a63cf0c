"""SIGTERM during a large batch: the worker finishes it (or rolls it back) and exits within a bound;
the next start resumes exactly where it stopped."""

from __future__ import annotations

import signal
import time

from processor.database import connect
from tests.fix_database import make_settings, subprocess_env
from tests.helpers import BACKLOG, WorkerProcess, consumer_os_pid, drain, pending_work, wait_for
from tests.reference import actual_job_states, reference_job_states

STEPS = ("ingest", "detect", "segment", "iou_eval")


def in_a_batch(conn, os_pid: int) -> bool:
    row = conn.execute(
        "SELECT state FROM pg_stat_activity WHERE application_name LIKE %s", [f"outbox-worker:%:{os_pid}"]
    ).fetchone()
    return bool(row and row[0] in ("active", "idle in transaction"))


def test_sigterm_during_a_large_batch_stops_within_a_bound_and_the_next_start_resumes(db, tmp_path):
    with connect(db, application_name="setup") as conn:
        conn.execute(BACKLOG)
        total = conn.execute("SELECT count(*) FROM outbox_events").fetchone()[0]
    worker = WorkerProcess(subprocess_env(db, OUTBOX_BATCH_SIZE="20000"), tmp_path / "worker.log")
    try:
        with connect(db, application_name="observer") as conn:
            wait_for(lambda: consumer_os_pid(conn) == worker.pid, what="the worker to start")
            wait_for(lambda: in_a_batch(conn, worker.pid), what="the worker to be inside a batch")
            worker.signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert worker.wait(timeout=60) == 0
            stopped_after = time.monotonic() - signalled
            assert "SIGTERM: stopping after the batch in hand" in worker.output()
            applied_before = conn.execute("SELECT events_applied FROM outbox_checkpoints").fetchone()[0]
            assert applied_before < total  # it stopped, it did not drain everything first

            stats = drain(make_settings(db, batch_size=20000))
            assert pending_work(conn) == 0
            applied = conn.execute("SELECT events_applied FROM outbox_checkpoints").fetchone()[0]
            assert applied == total and stats.events == total - applied_before
            assert actual_job_states(conn) == reference_job_states(conn, STEPS)
        print(
            f"\nSIGTERM inside a 20,000-event batch: exited 0 after {stopped_after:.2f} s with "
            f"{applied_before} of {total} events applied; the next start applied the other {stats.events}"
        )
    finally:
        worker.kill()
