"""Lost connections and a zombie worker: detected within a bound, recovered, nothing lost or doubled."""

from __future__ import annotations

import signal
import time

from processor.database import DatabaseUrl, connect
from tests.fix_database import subprocess_env
from tests.helpers import JOB_WRITES_AUDIT, WorkerProcess, consumer_os_pid, finish_jobs, pending_work, wait_for
from tests.reference import actual_job_states, reference_job_states
from tests.reliability.proxy import StallableProxy

STEPS = ("ingest", "detect", "segment", "iou_eval")


def time_to_apply(conn, engine, count: int = 3, timeout: float = 60) -> float:
    """Write ``count`` finished jobs and return how long until the worker has applied them."""
    started = time.monotonic()
    finish_jobs(engine, count)
    wait_for(lambda: pending_work(conn) == 0, timeout=timeout, what="the worker to apply new events")
    return time.monotonic() - started


def assert_exactly_once(conn) -> None:
    total, applied = conn.execute(
        "SELECT (SELECT count(*) FROM outbox_events), (SELECT events_applied FROM outbox_checkpoints)"
    ).fetchone()
    assert applied == total
    assert actual_job_states(conn) == reference_job_states(conn, STEPS)


def test_a_terminated_worker_connection_is_replaced(db, engine, tmp_path):
    worker = WorkerProcess(subprocess_env(db), tmp_path / "worker.log")
    try:
        with connect(db, application_name="observer") as conn:
            wait_for(lambda: consumer_os_pid(conn) == worker.pid, what="the worker to start")
            time_to_apply(conn, engine)
            terminated = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
                [f"outbox-worker:%:{worker.pid}"],
            ).fetchall()
            assert terminated == [(True,)]
            recovery = time_to_apply(conn, engine)
            assert worker.process.poll() is None  # reconnected, did not crash
            assert "reconnecting" in worker.output()
            assert_exactly_once(conn)
            print(f"\nworker connection terminated: new events applied {recovery:.2f} s later")
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0


def test_a_half_open_connection_is_detected_and_replaced(db, engine, tmp_path):
    proxy = StallableProxy((db.url.host or "127.0.0.1", db.url.port or 5432))
    through_proxy = DatabaseUrl(db.url.set(host="127.0.0.1", port=proxy.port))
    env = subprocess_env(
        through_proxy,
        OUTBOX_STATEMENT_TIMEOUT="2",
        OUTBOX_SESSION_TIMEOUT="2",
        OUTBOX_STANDBY_INTERVAL="0.2",
        OUTBOX_ALLOW_SESSION_PROXY="1",  # this proxy is one TCP connection per session
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        with connect(db, application_name="observer") as conn:
            wait_for(lambda: consumer_os_pid(conn) == worker.pid, what="the worker to start")
            time_to_apply(conn, engine)
            assert proxy.stall() >= 1  # the worker's connection now forwards nothing, and stays up
            recovery = time_to_apply(conn, engine)
            assert worker.process.poll() is None
            assert "no answer from the database" in worker.output()
            assert_exactly_once(conn)
            print(f"\nhalf-open connection: detected and new events applied {recovery:.2f} s after the stall")
    finally:
        worker.signal(signal.SIGTERM)
        worker.wait(timeout=30)
        proxy.close()


def test_a_stopped_worker_is_replaced_and_applies_nothing_after_it_resumes(db, engine, tmp_path):
    env = subprocess_env(db, OUTBOX_SESSION_TIMEOUT="2", OUTBOX_STANDBY_INTERVAL="0.1")
    with connect(db, application_name="observer") as conn:
        conn.execute(JOB_WRITES_AUDIT)
        first = WorkerProcess(env, tmp_path / "first.log")
        second = WorkerProcess(env, tmp_path / "second.log")
        try:
            active = wait_for(lambda: consumer_os_pid(conn), what="a worker to take the lock")
            zombie, standby = (first, second) if active == first.pid else (second, first)
            time_to_apply(conn, engine)

            zombie.signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            wait_for(lambda: consumer_os_pid(conn) == standby.pid, timeout=30, what="the standby to take over")
            takeover = time.monotonic() - stopped_at
            time_to_apply(conn, engine)

            zombie.signal(signal.SIGCONT)
            resumed = conn.execute("SELECT clock_timestamp()").fetchone()[0]
            wait_for(lambda: "reconnecting" in zombie.output(), what="the old worker to notice it lost its session")
            time_to_apply(conn, engine)
            writers = {
                row[0] for row in conn.execute("SELECT DISTINCT writer FROM job_writes WHERE at > %s", [resumed])
            }
            assert writers and all(writer.endswith(f":{standby.pid}") for writer in writers), writers
            assert consumer_os_pid(conn) == standby.pid
            assert_exactly_once(conn)
            print(
                f"\nzombie (SIGSTOP) worker: standby took over after {takeover:.2f} s; "
                "nothing applied by it after SIGCONT"
            )
        finally:
            for worker in (first, second):
                worker.signal(signal.SIGCONT)
                worker.signal(signal.SIGTERM)
                worker.wait(timeout=30)


def test_a_worker_frozen_inside_its_batch_past_the_session_timeout_becomes_a_standby(db, conn, engine, signals):
    """The server ends the frozen worker's session (idle_in_transaction_session_timeout, SQLSTATE 25P03):
    its batch rolls back, a standby takes over, and the resumed worker reconnects as a standby instead
    of exiting."""
    import threading

    from processor.testsignal import Signal
    from processor.worker import Worker
    from tests.fix_database import make_settings

    settings = make_settings(db, session_timeout=2, standby_interval=0.1, poll_interval_max=0.05)
    standby_active = threading.Event()
    frozen = threading.Event()

    def freeze_once() -> None:  # the first batch's transaction stays open until the standby took over
        if not frozen.is_set():
            frozen.set()
            assert standby_active.wait(timeout=60), "the standby never took over"

    first = Worker(settings, db, before_commit=freeze_once)
    second = Worker(settings, db)
    errors: list[BaseException] = []

    def run(worker: Worker) -> None:
        try:
            worker.run()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in (first, second)]
    with (
        signals.expect(Signal.PARTITION_READY, worker=first) as first_active,
        signals.expect(Signal.PARTITION_READY, worker=second) as second_active,
        signals.expect(Signal.SESSION_READY, worker=first, count=2) as first_sessions,
    ):
        threads[0].start()
        first_active.wait()  # the first worker took the lock
        threads[1].start()
        finish_jobs(engine, 3)
        assert frozen.wait(30), "the first worker did not freeze inside a batch"
        second_active.wait(30)  # the standby took over from the frozen worker
    standby_active.set()
    try:
        wait_for(lambda: pending_work(conn) == 0, what="the new active worker to apply")
        time_to_apply(conn, engine)
        first_sessions.wait(30)  # the frozen worker reconnected (a standby)
        assert not errors, repr(errors[0])
        assert threads[0].is_alive(), "the frozen worker exited instead of becoming a standby"
        assert not first.active.is_set()
        assert first.stats.events == 0  # its frozen batch rolled back; it applied nothing after
        assert second.stats.events == conn.execute("SELECT count(*) FROM outbox_events").fetchone()[0]
        assert_exactly_once(conn)
    finally:
        for worker in (first, second):
            worker.stop()
        for thread in threads:
            thread.join(timeout=30)
    assert not errors, repr(errors[0])
