"""Concurrency stress: many writers, both capture paths, the worker running throughout."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

import pytest

from processor import workload
from processor.batch import BatchResult
from processor.database import DatabaseUrl, connect
from processor.worker import Worker
from tests.fix_database import make_settings
from tests.helpers import pending_work, wait_for
from tests.reference import actual_job_states, reference_job_states

STEPS = workload.STEPS
JOBS, WRITERS = 300, 8


class RecordingWorker:
    """The worker, in a thread for the whole test; every event id it applies is recorded, to prove
    that each event took effect exactly once."""

    def __init__(self, db: DatabaseUrl, batch_size: int) -> None:
        self.applied_ids: list[int] = []
        self.errors: list[BaseException] = []
        self.worker = Worker(make_settings(db, batch_size=batch_size), db, on_batch=self._on_batch)
        self.thread = threading.Thread(target=self._run)

    def _on_batch(self, result: BatchResult) -> None:
        self.applied_ids.extend(result.event_ids)

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.errors.append(exc)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(timeout=30)


@dataclass
class Outcome:
    """What the database holds once the worker has drained."""

    expected: dict[uuid.UUID, tuple[str, str | None]]
    actual: dict[uuid.UUID, tuple[str, str | None]]
    all_ids: list[int]
    applied: int  # events_applied of the checkpoint
    dirty: int  # jobs left awaiting their fold
    applied_while_writing: int
    writing: float
    drained: float


def plan_walks(engine, rng: random.Random) -> dict[uuid.UUID, deque[workload.Move]]:
    """Every variant's moves; a third of the jobs must end done: none may stay stuck."""
    walks: dict[uuid.UUID, deque[workload.Move]] = {}
    with engine.begin() as conn:
        jobs = workload.create_jobs(conn, JOBS, rng, variants=(3, 20))
    for index, variants in enumerate(jobs.values()):
        walks.update((v, workload.random_walk(rng, completing=index % 3 == 0)) for v in variants)
    return walks


def write_every_walk_then_drain(db, writers: workload.WalkWriters, worker: RecordingWorker) -> Outcome:
    started = time.monotonic()
    writers.start().join()
    assert not writers.errors, writers.errors[0]
    writing = time.monotonic() - started
    with connect(db, application_name="checker") as conn:
        applied_while_writing = len(worker.applied_ids)
        wait_for(lambda: pending_work(conn) == 0, timeout=120, what="the worker to drain")
        drained = time.monotonic() - started
        worker.stop()
        assert not worker.errors, worker.errors[0]
        return Outcome(
            expected=reference_job_states(conn, STEPS),
            actual=actual_job_states(conn),
            all_ids=[row[0] for row in conn.execute("SELECT event_id FROM outbox_events").fetchall()],
            applied=conn.execute("SELECT events_applied FROM outbox_checkpoints").fetchone()[0],
            dirty=conn.execute("SELECT count(*) FROM outbox_dirty_jobs").fetchone()[0],
            applied_while_writing=applied_while_writing,
            writing=writing,
            drained=drained,
        )


def check_job_states_equal_the_reference_and_none_is_stuck(outcome: Outcome) -> None:
    expected, actual = outcome.expected, outcome.actual
    assert actual == expected
    stuck = [j for j, (status, _) in expected.items() if status == "done" and actual[j][0] != "done"]
    assert not stuck
    assert sum(1 for status, _ in expected.values() if status == "done") >= JOBS // 3


def check_every_event_applied_and_counted_exactly_once(outcome: Outcome, applied_ids: list[int]) -> None:
    assert sorted(applied_ids) == sorted(outcome.all_ids)  # every event applied, none twice
    assert len(set(applied_ids)) == len(applied_ids)
    assert outcome.applied == len(outcome.all_ids)  # and counted exactly once by the checkpoint
    assert outcome.dirty == 0
    assert outcome.applied_while_writing > 0  # the worker was applying while the writers wrote


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1000, 37], ids=["whole-catch-ups", "multi-batch-catch-ups"])
def test_concurrent_writers_with_the_worker_running_end_equal_to_the_reference(db, engine, batch_size):
    rng = random.Random(20261126 + batch_size)
    walks = plan_walks(engine, rng)
    total_moves = sum(len(m) for m in walks.values())
    worker = RecordingWorker(db, batch_size)
    worker.start()
    # Sometimes several variants in one transaction; some transactions roll back (written again later).
    writers = workload.WalkWriters(
        db, engine, walks, writers=WRITERS, seed=rng.random(), batch_sizes=(1, 1, 1, 1, 2, 3), rollback_rate=0.03
    )
    try:
        outcome = write_every_walk_then_drain(db, writers, worker)
    finally:
        worker.stop()

    assert writers.counts["committed"] == total_moves
    check_job_states_equal_the_reference_and_none_is_stuck(outcome)
    check_every_event_applied_and_counted_exactly_once(outcome, worker.applied_ids)
    counts = writers.counts
    print(
        f"\nstress: {JOBS} jobs, {len(walks)} variants, {counts['committed']} variant updates "
        f"({counts['multi']} multi-variant transactions, {counts['rolled_back']} rolled back) from {WRITERS} "
        f"writers in {outcome.writing:.1f} s; batch size {batch_size}; {outcome.applied_while_writing} of "
        f"{len(outcome.all_ids)} events applied while writing; "
        f"drained {outcome.drained - outcome.writing:.2f} s after the last write"
    )
