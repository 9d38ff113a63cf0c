"""The worker survives its server crashing (immediate restarts) while writers keep writing.

A private server (tests.reliability.fix_server) is restarted in immediate mode several times under
`outbox run` (a subprocess) and writer threads. The worker must never exit, must resume soon after
each restart, and once the writers stop must drain to job states equal to the reference; every
change a writer committed must have exactly its event, and nothing half-written may remain from the
transactions the crashes broke.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg

import outbox
from processor.database import DatabaseUrl, connect
from processor.fold import Pipeline
from processor.migrate import migrate
from processor.verify import verify
from tests.fix_database import TEST_STEPS, subprocess_env
from tests.helpers import WorkerProcess, consumer_os_pid, pending_work, wait_for
from tests.reference import actual_job_states, reference_job_states
from tests.reliability.fix_server import OwnedServer

STEPS = ("ingest", "detect", "segment", "iou_eval")
STATUSES = ("queued", "running", "done", "failed")
STATES = [(status, step) for status in STATUSES for step in STEPS]
RESTARTS = 5
WRITERS = 6
JOBS, VARIANTS_PER_JOB = 30, 4
# Seconds from a restarted server accepting connections to the worker applying an event. The
# worker's backoff is capped at 10 s plus 0.5 s of jitter. It is not restarted per outage (the nth
# reconnect of a worker's life waits about 0.2 * 2**n s, so from the 6th on ~10 s): once it is, every
# recovery here takes well under a second and this bound can be 5 s.
RECOVERY_BOUND = 5.0
# Each writer transaction records itself here, in the same transaction as its variant change: after
# a crash, a writer whose COMMIT got no answer looks its transaction up to learn whether it committed.
WRITES_DDL = """
CREATE TABLE reliability_writes (
    tx_id      uuid PRIMARY KEY,
    writer     integer NOT NULL,
    variant_id uuid NOT NULL,
    status     text NOT NULL,
    step       text NOT NULL
)
"""
WRITE_RECORD = (
    "INSERT INTO reliability_writes (tx_id, writer, variant_id, status, step) "
    "VALUES (%(tx_id)s, %(writer)s, %(variant_id)s, %(status)s, %(step)s)"
)
PLAIN_SQL = (
    "UPDATE jobs_variants SET status = %(status)s, current_step = %(step)s, updated_at = now() "
    "WHERE job_variants_id = %(variant_id)s"
)


@dataclass
class Writer:
    """One writer connection owning some variants: it always knows their committed state."""

    index: int
    db: DatabaseUrl
    variants: list[uuid.UUID]
    stop: threading.Event
    plain_sql: bool
    state: dict[uuid.UUID, tuple[str, str | None]] = field(default_factory=dict)
    committed: Counter[uuid.UUID] = field(default_factory=Counter)
    failed: int = 0  # transactions that raised because the server went away
    refused: int = 0  # connection attempts while the server was down
    committed_unacknowledged: int = 0  # of those, COMMITs that took effect although no answer came
    error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(self.index)
        self.state = dict.fromkeys(self.variants, ("queued", None))
        conn: psycopg.Connection[Any] | None = None
        unknown: dict[str, Any] | None = None  # the transaction whose outcome a crash hid
        try:
            while not self.stop.is_set():
                try:
                    if conn is None:
                        try:
                            conn = connect(self.db, application_name=f"writer-{self.index}", autocommit=False)
                        except psycopg.OperationalError:
                            self.refused += 1
                            self.stop.wait(0.05)  # the server is down: try again shortly
                            continue
                    if unknown is not None:
                        found = conn.execute("SELECT 1 FROM reliability_writes WHERE tx_id = %s", [unknown["tx_id"]])
                        if found.fetchone():
                            self._committed(unknown)
                            self.committed_unacknowledged += 1
                        conn.rollback()
                        unknown = None
                    variant = rng.choice(self.variants)
                    status, step = rng.choice([s for s in STATES if s != self.state[variant]])
                    write = {"tx_id": uuid.uuid4(), "writer": self.index, "variant_id": variant}
                    write.update(status=status, step=step)
                    unknown = write
                    if self.plain_sql:
                        conn.execute(PLAIN_SQL, write)
                    else:
                        outbox.update_variant(conn, variant, status=status, step=step)
                    conn.execute(WRITE_RECORD, write)
                    conn.commit()
                    unknown = None
                    self._committed(write)
                except psycopg.OperationalError:
                    self.failed += 1
                    if conn is not None:
                        conn.close()
                    conn = None
                    continue
                self.stop.wait(0.003)  # a steady write rate, not a flood
            if unknown is not None:  # stopped right after a crash: learn how that transaction ended
                if conn is not None:
                    conn.close()
                with connect(self.db, application_name=f"writer-{self.index}") as check:
                    if check.execute(
                        "SELECT 1 FROM reliability_writes WHERE tx_id = %s", [unknown["tx_id"]]
                    ).fetchone():
                        self._committed(unknown)
                        self.committed_unacknowledged += 1
                conn = None
        except BaseException as exc:
            self.error = exc
        finally:
            if conn is not None:
                conn.close()

    def _committed(self, write: dict[str, Any]) -> None:
        self.state[write["variant_id"]] = (write["status"], write["step"])
        self.committed[write["variant_id"]] += 1


def events_applied(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT events_applied FROM outbox_checkpoints WHERE partition = 0").fetchone()
    assert row is not None
    return int(row[0])


def applied_after(db: DatabaseUrl, count: int, *, timeout: float, what: str) -> None:
    """Wait until the worker's checkpoint has counted more than ``count`` events."""
    with connect(db, application_name="reliability-checker") as conn:
        wait_for(lambda: events_applied(conn) > count, timeout=timeout, what=what)


def test_worker_resumes_after_immediate_restarts_and_nothing_is_lost(own_server: OwnedServer, tmp_path):
    db = own_server.url
    with connect(db, application_name="reliability-setup") as conn:
        migrate(conn, pipeline=Pipeline(TEST_STEPS))
        conn.execute(WRITES_DDL)
        variants: list[uuid.UUID] = []
        with conn.transaction():
            for _ in range(JOBS):
                variants.extend(outbox.create_job(conn, variants=VARIANTS_PER_JOB)[1])

    stop = threading.Event()
    writers = [
        Writer(i, db, variants[i::WRITERS], stop, plain_sql=i % 2 == 0) for i in range(WRITERS)
    ]  # disjoint variants: each writer knows the committed state of its own
    threads = [threading.Thread(target=w.run, name=f"writer-{w.index}") for w in writers]
    worker = WorkerProcess(subprocess_env(db, OUTBOX_PIPELINE_STEPS=",".join(STEPS)), tmp_path / "worker.log")
    started = time.monotonic()
    recoveries: list[float] = []
    try:
        with connect(db, application_name="reliability-checker") as conn:
            wait_for(lambda: consumer_os_pid(conn) == worker.pid, timeout=30, what="the worker to become active")
            baseline = events_applied(conn)
        for thread in threads:
            thread.start()
        applied_after(db, baseline, timeout=30, what="the worker to apply the writers' first events")

        for number in range(1, RESTARTS + 1):
            back = own_server.restart("immediate")
            with connect(db, application_name="reliability-checker") as conn:
                at_restart = events_applied(conn)  # read at once: the worker is still backing off
                wait_for(
                    lambda conn=conn, at_restart=at_restart: events_applied(conn) > at_restart,
                    timeout=30,
                    what=f"the worker to apply an event after restart {number}",
                )
            recoveries.append(time.monotonic() - back)
            assert worker.process.poll() is None, f"the worker exited after restart {number}:\n{worker.output()}"

        stop.set()
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), f"{thread.name} did not stop"
        for writer in writers:
            assert writer.error is None, writer.error
        writing = time.monotonic() - started

        with connect(db, application_name="reliability-checker") as conn:
            wait_for(lambda: pending_work(conn) == 0, timeout=60, what="the worker to drain")
            expected = reference_job_states(conn, STEPS)
            actual = actual_job_states(conn)
            events = Counter(
                row[0]
                for row in conn.execute(
                    "SELECT variant_id FROM outbox_events WHERE event_type = 'variant_changed'"
                ).fetchall()
            )
            recorded = Counter(row[0] for row in conn.execute("SELECT variant_id FROM reliability_writes").fetchall())
            rows = {
                row[0]: (row[1], row[2])
                for row in conn.execute("SELECT job_variants_id, status, current_step FROM jobs_variants").fetchall()
            }
            report = verify(conn)
        assert worker.process.poll() is None, f"the worker exited:\n{worker.output()}"
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.output()
    finally:
        stop.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(timeout=30)
        worker.kill()

    committed = sum((w.committed for w in writers), Counter())
    # What each writer knows it committed is exactly what the database holds: no lost commit, no
    # half-written transaction (a variant change without its record, or the reverse).
    assert recorded == committed
    # Every committed change has exactly one event (plus the one from create_job), and no event
    # exists for a change that was rolled back by a crash.
    assert events == {v: committed[v] + 1 for v in variants}
    state = {v: s for w in writers for v, s in w.state.items()}
    assert rows == state
    assert actual == expected
    assert not report.drift, report.as_dict()
    log = worker.output()
    reconnect_attempts = log.count("database unavailable")
    sessions = log.count("active consumer of partition")
    assert sessions >= RESTARTS + 1, log[-3000:]  # it became the active consumer again after each restart
    failed = sum(w.failed for w in writers)
    unacknowledged = sum(w.committed_unacknowledged for w in writers)
    refused = sum(w.refused for w in writers)
    assert failed > 0  # the crashes did break writers' transactions in flight
    assert max(recoveries) < RECOVERY_BOUND, recoveries
    print(
        f"\nrestarts: {RESTARTS} immediate restarts under {WRITERS} writers and `outbox run`; "
        f"worker recovery after each (s): {', '.join(f'{r:.2f}' for r in recoveries)}; "
        f"{reconnect_attempts} reconnect attempts logged, {sessions} worker sessions; "
        f"{committed.total()} writer transactions committed, {failed} failed "
        f"({unacknowledged} of them committed without an answer), {refused} writer connections refused; "
        f"{sum(events.values())} variant events; "
        f"{len(expected)} jobs equal to the reference; writing {writing:.1f} s"
    )
