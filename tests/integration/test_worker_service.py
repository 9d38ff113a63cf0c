"""processor.WorkerService: the worker inside an application's process (threads, asyncio), its health,
and the subscribers' `with` form and health.

Every test runs the real worker against a real database; waits are on conditions, with deadlines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import URL

import outbox
import outbox.aio
import processor
from outbox.subscription import SubscriberState, SubscriptionNotFoundError
from processor import store, subscriptions
from processor.database import DatabaseUrl, connect
from processor.errors import ConfigurationError
from processor.service import WorkerState
from processor.testsignal import Signal
from processor.worker import PartitionCountError, application_name
from tests.fix_database import subprocess_env
from tests.helpers import BACKLOG, WorkerProcess, finish_jobs, make_jobs, pending_work, wait_for, wait_for_async
from tests.reference import actual_job_states, reference_job_states
from tests.reliability.fleet import (
    STEPS,
    Writers,
    check_audit,
    check_final_state,
    install_audits,
    repartition_now,
    shares,
    stop_cleanly,
)

PASSWORD = "s3cr3t@#:/pw"  # the test server trusts 127.0.0.1: any password connects
EFFECTS = "CREATE TABLE effects (transition_id bigint, job_id uuid, to_status text)"


def url_of(db: DatabaseUrl) -> str:
    return db.url.render_as_string(hide_password=False)


def service_for(db: DatabaseUrl, **settings: Any) -> processor.WorkerService:
    """A service as an application builds one, polling and rebalancing fast for the tests."""
    values: dict[str, Any] = {"poll_interval_min": 0.002, "poll_interval_max": 0.05, "standby_interval": 0.1}
    values.update(settings)
    return processor.WorkerService(database_url=url_of(db), **values)


def consumer_locks(conn: psycopg.Connection[Any], backend: int) -> list[int]:
    """The partitions whose consumer lock the session ``backend`` holds."""
    rows = conn.execute(
        "SELECT objid::int FROM pg_locks WHERE pid = %s AND locktype = 'advisory' AND granted "
        "AND classid = %s::oid AND objsubid = 2",
        [backend, store.CONSUMER_LOCK_CLASS],
    ).fetchall()
    return [row[0] for row in rows]


def worker_backends(conn: psycopg.Connection[Any]) -> list[int]:
    """The server pids of this process's worker sessions."""
    rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", [application_name()]).fetchall()
    return [row[0] for row in rows]


def in_a_batch(conn: psycopg.Connection[Any], backend: int) -> bool:
    """The session is inside a transaction that wrote (a batch: it locked its checkpoint row)."""
    row = conn.execute(
        "SELECT state IN ('active', 'idle in transaction') AND backend_xid IS NOT NULL "
        "FROM pg_stat_activity WHERE pid = %s",
        [backend],
    ).fetchone()
    return bool(row and row[0])


def in_state(service: Any, state: Any) -> Callable[[], bool]:
    return lambda: service.health().state is state


# --- The sync forms ------------------------------------------------------------------------------


def test_the_with_form_runs_the_worker_in_a_thread_and_leaving_it_stops_the_worker(db, conn, engine, signals):
    service = service_for(db)
    assert service.health().state is WorkerState.NEW and not service.health().ok
    with signals.expect(Signal.SESSION_READY, worker=service.worker) as ready, service:
        ready.wait()
        health = service.health()
        assert health.state is WorkerState.ACTIVE
        assert health.ok and health.connected and health.partitions == (0,) and health.problems == ()
        (backend,) = worker_backends(conn)
        assert consumer_locks(conn, backend) == [0]
        with signals.expect(Signal.BATCH_COMMITTED, worker=service.worker) as batches:
            finish_jobs(engine, 10)  # 10 jobs x 2 variants x 2 events
        batches.wait_total("events", 40)
        assert pending_work(conn) == 0 and service.health().events == 40
    # Left: the batch in hand finished, the partition released, the thread joined.
    health = service.health()
    assert health.state is WorkerState.STOPPED and not health.ok and not health.connected
    assert health.partitions == () and health.problems == ("the worker is stopped",)
    assert health.events == 40 and health.batches >= 1 and health.jobs_changed >= 10
    assert consumer_locks(conn, backend) == []
    assert actual_job_states(conn) == reference_job_states(conn, STEPS)
    with pytest.raises(RuntimeError, match="already been started"):
        service.start()


def test_run_blocks_until_stop_is_called_from_another_thread(db, conn, engine):
    service = service_for(db)
    finish_jobs(engine, 5)

    def stop_once_applied() -> None:
        wait_for(lambda: pending_work(conn) == 0, what="the service to apply")
        service.stop()

    stopper = threading.Thread(target=stop_once_applied)
    stopper.start()
    stats = service.run()  # returns once stopped
    stopper.join()
    assert stats.events == 20 and service.health().state is WorkerState.STOPPED
    assert actual_job_states(conn) == reference_job_states(conn, STEPS)


def test_health_is_standby_while_another_worker_holds_the_partition_and_active_once_it_takes_over(db, conn, signals):
    first, second = service_for(db), service_for(db)
    with (
        signals.expect(Signal.SESSION_READY, worker=first.worker) as active,
        signals.expect(Signal.PARTITION_READY, worker=second.worker, partition=0) as taking_over,
        first,
    ):
        active.wait()
        assert first.health().state is WorkerState.ACTIVE
        with signals.expect(Signal.SESSION_READY, worker=second.worker) as standing_by:
            second.start()
        standing_by.wait()
        standby = second.health()
        assert standby.state is WorkerState.STANDBY
        assert standby.ok and standby.connected and standby.partitions == ()  # a standby is healthy
        assert first.health().partitions == (0,)
    left = time.monotonic()
    taking_over.wait(10)
    assert second.health().state is WorkerState.ACTIVE
    took_over = time.monotonic() - left
    assert second.health().partitions == (0,)
    second.stop()
    second.join()
    assert second.health().state is WorkerState.STOPPED
    print(f"\nstandby service took over {took_over:.3f} s after the active one left its block")


def test_a_service_shares_the_partitions_with_an_outbox_run_process_and_takes_them_all_when_it_stops(
    db, conn, tmp_path, signals
):
    repartition_now(db, 4)
    me = os.getpid()
    service = service_for(db)
    with signals.expect(Signal.SESSION_READY, worker=service.worker) as ready, service:
        ready.wait()
        assert service.health().partitions == (0, 1, 2, 3)  # the service took all 4
        run = WorkerProcess(subprocess_env(db, OUTBOX_STANDBY_INTERVAL="0.1"), tmp_path / "run.log")
        try:
            # The subprocess's share is seen in the database; the service's in its signals.
            wait_for(lambda: shares(conn, {me, run.pid}, 4) == [2, 2], timeout=60, what="2 partitions each")
            assert len(service.health().partitions) == 2 and service.health().state is WorkerState.ACTIVE
            with signals.expect(Signal.PARTITION_READY, worker=service.worker, count=2) as retaken:
                stop_cleanly(run)
            retaken.wait(10)
        finally:
            run.kill()
        assert service.health().partitions == (0, 1, 2, 3)  # the service took them all again


# --- Settings and errors -------------------------------------------------------------------------


def test_settings_come_from_keywords_then_the_environment_and_a_missing_url_is_one_line(db, monkeypatch):
    for name in [name for name in os.environ if name.startswith("OUTBOX_")]:
        monkeypatch.delenv(name)

    def no_embedded_server(*args: Any) -> str:
        raise AssertionError("a WorkerService started the embedded server")

    monkeypatch.setattr("processor.embedded.embedded_database_url", no_embedded_server)
    with pytest.raises(ConfigurationError) as missing:
        processor.WorkerService(batch_size=10)
    message = str(missing.value)
    assert "\n" not in message and "OUTBOX_DATABASE_URL" in message and "database_url=" in message

    with pytest.raises(TypeError, match="unknown settings: batchsize"):
        processor.WorkerService(database_url=url_of(db), batchsize=10)  # a typo is no silent default
    with pytest.raises(ConfigurationError, match="batch_size=: Input should be greater") as invalid:
        processor.WorkerService(database_url=url_of(db), batch_size=0)  # named as the caller wrote it
    assert "\n" not in str(invalid.value) and "OUTBOX_" not in str(invalid.value)

    monkeypatch.setenv("OUTBOX_DATABASE_URL", url_of(db))
    monkeypatch.setenv("OUTBOX_BATCH_SIZE", "7")
    monkeypatch.setenv("OUTBOX_PARTITION", "0")
    from_env = processor.WorkerService()
    assert (from_env.settings.batch_size, from_env.settings.partition) == (7, 0)
    assert processor.WorkerService(batch_size=9).settings.batch_size == 9  # a keyword wins
    monkeypatch.setenv("OUTBOX_PARTITION", "-1")
    with pytest.raises(ConfigurationError, match="OUTBOX_PARTITION:"):  # a variable's problem names the variable
        processor.WorkerService()


def test_the_password_stays_out_of_the_log_the_health_and_the_repr(caplog):
    caplog.set_level(logging.DEBUG)
    url = URL.create("postgresql", "app", PASSWORD, "127.0.0.1", closed_port(), "app")
    service = processor.WorkerService(database_url=url.render_as_string(hide_password=False))
    with service:
        wait_for(lambda: service.health().last_error, what="a failed connection")
        health = service.health()
        assert health.state is WorkerState.CONNECTING and not health.ok
        assert health.problems == ("not connected to the database",)
    # Stopped while reconnecting: a stop, not a failure (the with form raised nothing).
    assert service.health().state is WorkerState.STOPPED
    shown = " ".join([caplog.text, repr(service), repr(service.health()), str(service.health().to_json())])
    assert "reconnecting" in caplog.text
    for form in (PASSWORD, "s3cr3t"):
        assert form not in shown


def closed_port() -> int:
    """A local port nothing listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_error_the_worker_dies_of_is_visible_in_health_and_raised_by_each_form(db, caplog):
    expected = "the database has 1 partition but OUTBOX_PARTITIONS is 3"
    service = service_for(db, partitions=3)
    with pytest.raises(PartitionCountError, match=expected), service:
        wait_for(in_state(service, WorkerState.FAILED), what="the worker to fail")
        health = service.health()
        assert not health.ok and health.last_error is not None and expected in health.last_error
        assert health.problems == (f"the worker failed: {health.last_error}",)
    assert expected in caplog.text  # logged when it died, not only when the block ended

    with pytest.raises(PartitionCountError):
        asyncio.run(service_for(db, partitions=3).run_async())
    with pytest.raises(PartitionCountError):
        service_for(db, partitions=3).run()


def test_metrics_and_health_are_served_on_a_port_with_the_same_rule_as_health(db, signals):
    def get(port: int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    service = service_for(db, metrics_port=0)
    with signals.expect(Signal.SESSION_READY, worker=service.worker) as ready, service:
        port = service.metrics_port
        assert port
        ready.wait()
        assert service.health().state is WorkerState.ACTIVE
        assert service.health().ok and get(port, "/health") == (200, "ok\n")
        assert 'outbox_active_consumer{partition="0"} 1.0' in get(port, "/metrics")[1]
    with pytest.raises(OSError):  # the port is closed with the run
        get(port, "/health")


# --- asyncio -------------------------------------------------------------------------------------


def test_cancelling_the_task_while_events_flow_stops_the_worker_cleanly_and_loses_nothing(
    db, conn, engine, capsys, signals
):
    install_audits(conn)
    # The audit counts from a repartition (tests/reliability/fleet.py); back to one partition: one
    # worker holds it, the other stands by.
    repartition_now(db, 2)
    repartition_now(db, 1)
    conn.execute(BACKLOG)
    jobs = make_jobs(engine, 60, random.Random(5))
    standby = service_for(db, batch_size=20000)
    figures: dict[str, float] = {}

    async def main() -> None:
        service = service_for(db, batch_size=20000)
        with signals.expect(Signal.SESSION_READY, worker=service.worker) as ready:
            task = asyncio.create_task(service.run_async())
            await asyncio.to_thread(ready.wait)
        assert service.health().state is WorkerState.ACTIVE
        (backend,) = await asyncio.to_thread(worker_backends, conn)
        with signals.expect(Signal.SESSION_READY, worker=standby.worker) as standing_by:
            standby.start()
            await asyncio.to_thread(standing_by.wait)
        assert standby.health().state is WorkerState.STANDBY
        taking_over = signals.expect(Signal.PARTITION_READY, worker=standby.worker, partition=0)
        first_batch = signals.expect(Signal.BATCH_COMMITTED, worker=service.worker)
        with Writers(db, engine, jobs, seed=5) as writers, first_batch as batches, taking_over as took_over:
            await asyncio.to_thread(batches.wait_total, "events", 1)
            await wait_for_async(lambda: in_a_batch(conn, backend), what="the worker to be inside a batch")
            cancelled = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            figures["stopped"] = time.monotonic() - cancelled
            # The task ended after the worker's thread: stopped, its partition released.
            assert service.health().state is WorkerState.STOPPED
            service.join(timeout=0)  # ended: no TimeoutError, no error
            assert consumer_locks(conn, backend) == []
            await asyncio.to_thread(took_over.wait, 10)
            assert standby.health().state is WorkerState.ACTIVE
            figures["takeover"] = time.monotonic() - cancelled
            figures["applied"] = service.health().events
            with signals.expect(Signal.BATCH_COMMITTED, worker=standby.worker) as applied:
                await asyncio.to_thread(applied.wait_total, "events", 201)  # the standby applies
            writers.stop()
        writers.check()
        await wait_for_async(lambda: pending_work(conn) == 0, timeout=120, what="the standby to drain")
        standby.stop()
        await asyncio.to_thread(standby.join)

    asyncio.run(main())
    jobs_total, _ = check_final_state(conn, 1)
    report = check_audit(conn)
    assert figures["takeover"] < 5.0
    with capsys.disabled():
        print(
            f"\ncancelled inside a batch: the task ended {figures['stopped']:.2f} s later (the worker had applied "
            f"{figures['applied']:.0f} events); the standby active {figures['takeover']:.2f} s after the cancel; "
            f"{jobs_total} jobs equal to the reference\n  audit: {report}"
        )


def test_the_async_with_form_stops_the_worker_when_the_block_ends(db, conn, engine, signals):
    finish_jobs(engine, 5)

    async def main() -> tuple[processor.WorkerHealth, int]:
        service = service_for(db)
        with signals.expect(Signal.BATCH_COMMITTED, worker=service.worker) as batches:
            async with service:
                await asyncio.to_thread(batches.wait_total, "events", 20)
                assert service.health().events == 20
                assert service.health().state is WorkerState.ACTIVE
                (backend,) = await asyncio.to_thread(worker_backends, conn)
        return service.health(), backend

    health, backend = asyncio.run(main())
    assert health.state is WorkerState.STOPPED and health.events == 20
    assert consumer_locks(conn, backend) == []


# --- The subscribers ------------------------------------------------------------------------------


def test_the_sync_subscriber_runs_in_a_with_block_and_shows_its_health(db, conn, engine):
    conn.execute(EFFECTS)
    with connect(db, application_name="outbox-tests") as op:
        subscriptions.create(op, "embedded", from_start=True, to_statuses=None)

    def handler(c: psycopg.Connection[Any], t: outbox.Transition) -> None:
        c.execute("INSERT INTO effects VALUES (%s, %s, %s)", [t.transition_id, t.job_id, t.to_status])

    def subscriber() -> outbox.Subscriber:
        return outbox.Subscriber("embedded", url_of(db), handler, poll_interval=0.05, standby_interval=0.05)

    first, second = subscriber(), subscriber()
    assert first.health().state is SubscriberState.NEW and not first.health().ok
    with service_for(db) as worker, first:
        wait_for(in_state(first, SubscriberState.ACTIVE), what="the first subscriber to be active")
        with second:
            wait_for(in_state(second, SubscriberState.STANDBY), what="the second to stand by")
            assert second.health().ok
            finish_jobs(engine, 10)
            wait_for(lambda: first.health().delivered >= 10, what="the active one to deliver")
            first.stop()
            first.join()
            assert first.health().state is SubscriberState.STOPPED
            wait_for(in_state(second, SubscriberState.ACTIVE), what="the standby to take over")
            finish_jobs(engine, 5)
            wait_for(lambda: second.health().delivered >= 5, what="the standby to deliver")
        assert second.health().state is SubscriberState.STOPPED
        assert worker.health().ok
    counts = conn.execute("SELECT transition_id, count(*) FROM effects GROUP BY 1").fetchall()
    total = conn.execute("SELECT count(*) FROM outbox_job_transitions").fetchone()[0]
    assert len(counts) == total and all(n == 1 for _, n in counts)
    assert first.health().delivered + second.health().delivered == total

    # One run per object: a second would share its state and deliver without the subscription's lock.
    again = subscriber()
    with again:
        wait_for(in_state(again, SubscriberState.ACTIVE), what="the subscriber to be active")
        with pytest.raises(RuntimeError, match="already running"):
            again.run()
        with pytest.raises(RuntimeError, match="already running"):
            again.start()
    assert again.health().state is SubscriberState.STOPPED

    missing = outbox.Subscriber("nobody", url_of(db), handler, poll_interval=0.05)
    with pytest.raises(SubscriptionNotFoundError), missing:
        wait_for(in_state(missing, SubscriberState.FAILED), what="the subscriber to fail")
        assert "no subscription named 'nobody'" in (missing.health().last_error or "")


def test_the_asyncio_subscriber_cancelled_inside_a_handler_rolls_it_back_and_releases_the_subscription(
    db, conn, engine, signals
):
    conn.execute(EFFECTS)
    with connect(db, application_name="outbox-tests") as op:
        subscriptions.create(op, "aio-cancel", from_start=True, to_statuses=None)
    finish_jobs(engine, 6)
    worker = service_for(db)
    with signals.expect(Signal.BATCH_COMMITTED, worker=worker.worker) as batches, worker:
        batches.wait_total("events", 24)  # the worker applied them
        assert worker.health().events == 24
    total = conn.execute("SELECT count(*) FROM outbox_job_transitions").fetchone()[0]
    in_handler: list[int] = []

    async def main() -> int:
        entered = asyncio.Event()

        async def handler(c: Any, t: outbox.Transition) -> None:
            await c.execute("INSERT INTO effects VALUES (%s, %s, %s)", [t.transition_id, t.job_id, t.to_status])
            in_handler.append(t.transition_id)
            if len(in_handler) == 4:  # partway through the first transaction of several transitions
                entered.set()
                await asyncio.Event().wait()  # until cancelled, its transaction open

        subscriber = outbox.aio.AsyncSubscriber("aio-cancel", url_of(db), handler, poll_interval=0.05)
        task = asyncio.create_task(subscriber.run())
        await wait_for_async(entered.is_set, what="the handler to be inside its transaction")
        assert subscriber.health().state is SubscriberState.ACTIVE
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        health = subscriber.health()
        assert health.state is SubscriberState.STOPPED and health.delivered == 0
        return len(in_handler)

    assert asyncio.run(main()) == 4
    assert conn.execute("SELECT count(*) FROM effects").fetchone()[0] == 0  # rolled back, none acknowledged
    # The lock went with the cancelled consumer: another one is active at once and delivers all, once each.
    again = outbox.Subscriber("aio-cancel", url_of(db), handler_sync)
    assert again.run_until_idle() == total
    counts = conn.execute("SELECT transition_id, count(*) FROM effects GROUP BY 1").fetchall()
    assert len(counts) == total and all(n == 1 for _, n in counts)


def handler_sync(c: psycopg.Connection[Any], t: outbox.Transition) -> None:
    c.execute("INSERT INTO effects VALUES (%s, %s, %s)", [t.transition_id, t.job_id, t.to_status])


def test_a_stop_right_after_start_is_kept(db):
    subscriber = outbox.Subscriber("never-created", url_of(db), handler_sync, poll_interval=0.05)
    subscriber.start()
    subscriber.stop()
    subscriber.join(timeout=10)  # it never read a page (that would raise: no such subscription)
    assert subscriber.health().state is SubscriberState.STOPPED
    service = service_for(db)
    service.start()
    service.stop()
    service.join(timeout=10)
    assert service.health().state is WorkerState.STOPPED
