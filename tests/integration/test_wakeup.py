"""OUTBOX_WAKEUP=notify: writers notify on commit, and the worker wakes up on it, not at its poll interval.

The poll interval in these tests is a minute, so a write applied within the test was applied because
a notification woke the worker; the waiter's count of why each wait ended says so directly.
"""

from __future__ import annotations

import re
import signal
import threading
import uuid
from typing import Any

import psycopg
import pytest

from processor import store
from processor.database import DatabaseUrl, connect
from processor.settings import Settings
from processor.testsignal import Signal
from processor.wakeup import Waiter, Wake
from processor.worker import Worker
from tests.fix_database import make_settings, subprocess_env
from tests.helpers import WorkerProcess, drain, job_state, wait_for

# Every wait lasts a minute unless something ends it first: the poll interval, and the standby
# interval (how often a worker checks its share of the partitions). Waits stay below half of the
# session timeout (processor.settings).
SLOW_POLL: dict[str, Any] = {
    "poll_interval_min": 60, "poll_interval_max": 60, "standby_interval": 60, "session_timeout": 300,
}  # fmt: skip


def new_job(conn: psycopg.Connection[Any]) -> tuple[uuid.UUID, uuid.UUID]:
    job, variant = uuid.uuid4(), uuid.uuid4()
    conn.execute("INSERT INTO jobs (job_id, status) VALUES (%s, 'queued')", [job])
    conn.execute(
        "INSERT INTO jobs_variants (job_variants_id, job_id, status) VALUES (%s, %s, 'queued')", [variant, job]
    )
    return job, variant


def move(conn: psycopg.Connection[Any], variant: uuid.UUID, step: str) -> None:
    conn.execute(
        "UPDATE jobs_variants SET status = 'running', current_step = %s WHERE job_variants_id = %s", [step, variant]
    )


class WorkerThread:
    """An in-process worker, so that the test can read its waiter; re-raises what the worker raised."""

    def __init__(self, settings: Settings, db: DatabaseUrl) -> None:
        self.worker = Worker(settings, db)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the worker did not stop"
        if self.error is not None:
            raise self.error


def test_a_notification_wakes_the_worker_long_before_its_poll_interval(db, conn, signals):
    conn.execute("SELECT outbox_wakeup_enable()")
    job, variant = new_job(conn)
    with signals.expect(Signal.BATCH_COMMITTED, partition=0) as first_batch:
        running = WorkerThread(make_settings(db, wakeup="notify", **SLOW_POLL), db)
    try:
        first_batch.wait_total("events", 1)
        assert job_state(conn, job) == ("queued", "ingest")
        for step in ("ingest", "detect", "segment"):
            with signals.expect(Signal.BATCH_COMMITTED, worker=running.worker) as applied:
                move(conn, variant, step)
            applied.wait_total("events", 1)  # long before the minute's poll interval
            assert job_state(conn, job) == ("running", step)
        wakes = running.worker.waiter.wakes
        # Each move was applied after a wait that a notification ended; no wait ran to its end.
        assert wakes[Wake.NOTIFY] >= 3, wakes
        assert wakes[Wake.TIMEOUT] == 0, wakes
    finally:
        running.stop()  # also ends the minute-long wait in hand at once
    assert running.worker.waiter.wakes[Wake.STOP] == 1


def test_without_the_trigger_a_notify_worker_polls_and_a_poll_worker_ignores_the_trigger(db, conn, caplog, signals):
    conn.execute("SELECT outbox_wakeup_disable()")  # not installed by migrate; idempotent
    job, variant = new_job(conn)
    with signals.expect(Signal.BATCH_COMMITTED, partition=0) as first_batch:
        running = WorkerThread(make_settings(db, wakeup="notify"), db)  # short poll intervals
    try:
        first_batch.wait_total("events", 1)
        assert job_state(conn, job) == ("queued", "ingest")
        with signals.expect(Signal.BATCH_COMMITTED, worker=running.worker) as applied:
            move(conn, variant, "detect")
        applied.wait_total("events", 1)  # by polling
        assert job_state(conn, job) == ("running", "detect")
    finally:
        running.stop()
    wakes = running.worker.waiter.wakes
    assert wakes[Wake.NOTIFY] == 0 and wakes[Wake.TIMEOUT] >= 1, wakes
    assert "run `outbox migrate --wakeup notify`" in caplog.text

    # Writers that notify with nobody listening, and a polling worker: as before.
    conn.execute("SELECT outbox_wakeup_enable()")
    conn.execute("SELECT outbox_wakeup_enable()")  # idempotent
    assert store.wakeup_trigger_enabled(conn)
    move(conn, variant, "segment")
    assert drain(make_settings(db)).events == 1
    assert job_state(conn, job) == ("running", "segment")
    store.wakeup_trigger_set(conn, enabled=False)
    assert not store.wakeup_trigger_enabled(conn)


def test_a_connection_lost_while_waiting_for_a_notification_ends_the_wait_with_an_error(db, conn):
    waiter = Waiter(threading.Event())
    try:
        with connect(db, application_name="outbox-test-listener") as listener:
            waiter.listen(listener)
            conn.execute("SELECT pg_terminate_backend(%s)", [listener.info.backend_pid])
            with pytest.raises(psycopg.OperationalError):
                waiter.wait(60)  # not a minute: the worker reconnects at once
    finally:
        waiter.close()


def test_sigterm_ends_a_notify_worker_waiting_on_its_connection(db, conn, tmp_path):
    conn.execute("SELECT outbox_wakeup_enable()")
    job, variant = new_job(conn)
    env = subprocess_env(
        db, OUTBOX_WAKEUP="notify", OUTBOX_POLL_INTERVAL_MIN="60", OUTBOX_POLL_INTERVAL_MAX="60",
        OUTBOX_STANDBY_INTERVAL="60", OUTBOX_SESSION_TIMEOUT="300",
    )  # fmt: skip
    worker = WorkerProcess(env, tmp_path / "worker.log")

    def shows(state: tuple[str, str]) -> bool:
        assert worker.process.poll() is None, worker.output()  # not waiting on a worker that exited
        return job_state(conn, job) == state

    try:
        wait_for(lambda: shows(("queued", "ingest")), what="the first batch")
        move(conn, variant, "detect")
        wait_for(lambda: shows(("running", "detect")), what="the move")
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, worker.output()
    finally:
        worker.kill()
    woke = re.search(r"woke up (\d+) times on a notification, (\d+) at the poll interval", worker.output())
    assert woke is not None, worker.output()
    assert int(woke.group(1)) >= 1 and int(woke.group(2)) == 0, woke.group(0)
