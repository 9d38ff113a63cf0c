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

from processor import workload
from processor.database import DatabaseUrl, connect
from processor.fold import Pipeline
from processor.migrate import migrate
from processor.verify import verify
from tests.fix_database import TEST_STEPS, subprocess_env
from tests.helpers import WorkerProcess, consumer_os_pid, pending_work, wait_for
from tests.reference import actual_job_states, reference_job_states
from tests.reliability.fix_server import OwnedServer

STEPS, STATUSES = workload.STEPS, workload.STATUSES
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
    _conn: psycopg.Connection[Any] | None = None
    _unknown: dict[str, Any] | None = None  # the transaction whose outcome a crash hid

    def run(self) -> None:
        rng = random.Random(self.index)
        self.state = dict.fromkeys(self.variants, ("queued", None))
        try:
            while not self.stop.is_set():
                if self._conn is None and not self._connect():
                    continue
                try:
                    self._write_one(rng)
                except psycopg.OperationalError:
                    self.failed += 1
                    self._disconnect()
                    continue
                self.stop.wait(0.003)  # a steady write rate, not a flood
            if self._unknown is not None:  # stopped right after a crash: learn how that transaction ended
                self._disconnect()
                with connect(self.db, application_name=f"writer-{self.index}") as check:
                    self._learn_outcome(check)
        except BaseException as exc:
            self.error = exc
        finally:
            self._disconnect()

    def _connect(self) -> bool:
        try:
            self._conn = connect(self.db, application_name=f"writer-{self.index}", autocommit=False)
        except psycopg.OperationalError:
            self.refused += 1
            self.stop.wait(0.05)  # the server is down: try again shortly
            return False
        return True

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _write_one(self, rng: random.Random) -> None:
        """One transaction: a variant to another state, and its record; known committed once COMMIT answers."""
        conn = self._conn
        assert conn is not None
        if self._unknown is not None:
            self._learn_outcome(conn)
            conn.rollback()
        variant = rng.choice(self.variants)
        status, step = rng.choice([s for s in STATES if s != self.state[variant]])
        write = {"tx_id": uuid.uuid4(), "writer": self.index, "variant_id": variant, "status": status, "step": step}
        self._unknown = write
        workload.write_variant(conn, variant, status, step, plain_sql=self.plain_sql)
        conn.execute(WRITE_RECORD, write)
        conn.commit()
        self._unknown = None
        self._committed(write)

    def _learn_outcome(self, conn: psycopg.Connection[Any]) -> None:
        """After a crash, look up the transaction whose COMMIT got no answer: did it commit?"""
        assert self._unknown is not None
        if conn.execute("SELECT 1 FROM reliability_writes WHERE tx_id = %s", [self._unknown["tx_id"]]).fetchone():
            self._committed(self._unknown)
            self.committed_unacknowledged += 1
        self._unknown = None

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


class WriterThreads:
    """``WRITERS`` writers on disjoint variants (each knows the committed state of its own), half plain SQL."""

    def __init__(self, db: DatabaseUrl, variants: list[uuid.UUID]) -> None:
        self.stop = threading.Event()
        self.writers = [Writer(i, db, variants[i::WRITERS], self.stop, plain_sql=i % 2 == 0) for i in range(WRITERS)]
        self.threads = [threading.Thread(target=w.run, name=f"writer-{w.index}") for w in self.writers]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop_and_check(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), f"{thread.name} did not stop"
        for writer in self.writers:
            assert writer.error is None, writer.error

    def ensure_stopped(self) -> None:
        self.stop.set()
        for thread in self.threads:
            if thread.is_alive():
                thread.join(timeout=30)

    def total(self, counter: str) -> int:
        return sum(getattr(w, counter) for w in self.writers)


@dataclass
class Outcome:
    """The database once the worker has drained."""

    expected: dict[uuid.UUID, tuple[str, str | None]]
    actual: dict[uuid.UUID, tuple[str, str | None]]
    events: Counter[uuid.UUID]  # variant_changed events per variant
    recorded: Counter[uuid.UUID]  # writer records per variant
    rows: dict[uuid.UUID, tuple[str, str | None]]  # each variant's row
    drift: bool
    report: Any


def create_jobs(db: DatabaseUrl) -> list[uuid.UUID]:
    """Migrate, add the writers' record table, create the jobs; their variants."""
    with connect(db, application_name="reliability-setup") as conn:
        migrate(conn, pipeline=Pipeline(TEST_STEPS))
        conn.execute(WRITES_DDL)
        with conn.transaction():
            jobs = workload.create_jobs(conn, JOBS, random.Random(0), variants=(VARIANTS_PER_JOB, VARIANTS_PER_JOB))
    return [v for variants in jobs.values() for v in variants]


def wait_until_the_worker_applies_the_writers_events(db: DatabaseUrl, worker: WorkerProcess, writers: WriterThreads):
    with connect(db, application_name="reliability-checker") as conn:
        wait_for(lambda: consumer_os_pid(conn) == worker.pid, timeout=30, what="the worker to become active")
        baseline = events_applied(conn)
    writers.start()
    applied_after(db, baseline, timeout=30, what="the worker to apply the writers' first events")


def restart_the_server_and_time_each_recovery(own_server: OwnedServer, worker: WorkerProcess) -> list[float]:
    """Restart in immediate mode RESTARTS times; the seconds from each restart to the worker applying an event."""
    recoveries: list[float] = []
    for number in range(1, RESTARTS + 1):
        back = own_server.restart("immediate")
        with connect(own_server.url, application_name="reliability-checker") as conn:
            at_restart = events_applied(conn)  # read at once: the worker is still backing off
            wait_for(
                lambda conn=conn, at_restart=at_restart: events_applied(conn) > at_restart,
                timeout=30,
                what=f"the worker to apply an event after restart {number}",
            )
        recoveries.append(time.monotonic() - back)
        assert worker.process.poll() is None, f"the worker exited after restart {number}:\n{worker.output()}"
    return recoveries


def drain_and_read(db: DatabaseUrl) -> Outcome:
    with connect(db, application_name="reliability-checker") as conn:
        wait_for(lambda: pending_work(conn) == 0, timeout=60, what="the worker to drain")
        expected = reference_job_states(conn, STEPS)
        actual = actual_job_states(conn)
        variant_events = "SELECT variant_id FROM outbox_events WHERE event_type = 'variant_changed'"
        events = Counter(row[0] for row in conn.execute(variant_events).fetchall())
        recorded = Counter(row[0] for row in conn.execute("SELECT variant_id FROM reliability_writes").fetchall())
        rows = {
            row[0]: (row[1], row[2])
            for row in conn.execute("SELECT job_variants_id, status, current_step FROM jobs_variants").fetchall()
        }
        report = verify(conn)
    return Outcome(expected, actual, events, recorded, rows, report.drift, report)


def stop_the_worker_cleanly(worker: WorkerProcess) -> None:
    assert worker.process.poll() is None, f"the worker exited:\n{worker.output()}"
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()


def check_every_commit_and_only_commits_took_effect(
    outcome: Outcome, writers: WriterThreads, variants: list[uuid.UUID]
) -> Counter[uuid.UUID]:
    committed = sum((w.committed for w in writers.writers), Counter())
    # What each writer knows it committed is exactly what the database holds: no lost commit, no
    # half-written transaction (a variant change without its record, or the reverse).
    assert outcome.recorded == committed
    # Every committed change has exactly one event (plus the one from create_job), and no event
    # exists for a change that was rolled back by a crash.
    assert outcome.events == {v: committed[v] + 1 for v in variants}
    state = {v: s for w in writers.writers for v, s in w.state.items()}
    assert outcome.rows == state
    assert outcome.actual == outcome.expected
    assert not outcome.drift, outcome.report
    return committed


def check_the_worker_came_back_after_each_restart(log: str, recoveries: list[float], writers: WriterThreads) -> int:
    """Returns the worker's sessions."""
    sessions = log.count("active consumer of partition")
    assert sessions >= RESTARTS + 1, log[-3000:]  # it became the active consumer again after each restart
    assert writers.total("failed") > 0  # the crashes did break writers' transactions in flight
    assert max(recoveries) < RECOVERY_BOUND, recoveries
    return sessions


def test_worker_resumes_after_immediate_restarts_and_nothing_is_lost(own_server: OwnedServer, tmp_path):
    db = own_server.url
    variants = create_jobs(db)
    writers = WriterThreads(db, variants)
    worker = WorkerProcess(subprocess_env(db, OUTBOX_PIPELINE_STEPS=",".join(STEPS)), tmp_path / "worker.log")
    started = time.monotonic()
    try:
        wait_until_the_worker_applies_the_writers_events(db, worker, writers)
        recoveries = restart_the_server_and_time_each_recovery(own_server, worker)
        writers.stop_and_check()
        writing = time.monotonic() - started
        outcome = drain_and_read(db)
        stop_the_worker_cleanly(worker)
    finally:
        writers.ensure_stopped()
        worker.kill()

    committed = check_every_commit_and_only_commits_took_effect(outcome, writers, variants)
    log = worker.output()
    sessions = check_the_worker_came_back_after_each_restart(log, recoveries, writers)
    print(
        f"\nrestarts: {RESTARTS} immediate restarts under {WRITERS} writers and `outbox run`; "
        f"worker recovery after each (s): {', '.join(f'{r:.2f}' for r in recoveries)}; "
        f"{log.count('database unavailable')} reconnect attempts logged, {sessions} worker sessions; "
        f"{committed.total()} writer transactions committed, {writers.total('failed')} failed "
        f"({writers.total('committed_unacknowledged')} of them committed without an answer), "
        f"{writers.total('refused')} writer connections refused; {sum(outcome.events.values())} variant events; "
        f"{len(outcome.expected)} jobs equal to the reference; writing {writing:.1f} s"
    )
