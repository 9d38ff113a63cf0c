"""Concurrency stress: many writers, both capture paths, the worker running throughout."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import deque

import pytest

import outbox
from processor.batch import BatchResult
from processor.database import connect
from processor.worker import Worker
from tests.fix_database import make_settings
from tests.helpers import pending_work, wait_for
from tests.reference import actual_job_states, reference_job_states

STEPS = ("ingest", "detect", "segment", "iou_eval")
STATUSES = ("queued", "running", "done", "failed")
PLAIN_SQL = (
    "UPDATE jobs_variants SET status = %(status)s, current_step = %(step)s, updated_at = now() "
    "WHERE job_variants_id = %(variant_id)s"
)


def random_walk(rng: random.Random, completing: bool) -> deque[tuple[str, str]]:
    """Random moves in random order (backwards too); a completing variant ends done at the final step."""
    moves = deque((rng.choice(STATUSES), rng.choice(STEPS)) for _ in range(rng.randint(1, 7)))
    if completing or rng.random() < 0.6:
        moves.append(("done", STEPS[-1]))
    return moves


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1000, 37], ids=["whole-catch-ups", "multi-batch-catch-ups"])
def test_concurrent_writers_with_the_worker_running_end_equal_to_the_reference(db, engine, batch_size):
    rng = random.Random(20261126 + batch_size)
    jobs, writers = 300, 8

    walks: dict[uuid.UUID, deque[tuple[str, str]]] = {}
    with engine.begin() as conn:
        for index in range(jobs):
            _, variants = outbox.create_job(conn, variants=rng.randint(3, 20))
            completing = index % 3 == 0  # a third of the jobs must end done: none may stay stuck
            walks.update((v, random_walk(rng, completing)) for v in variants)
    total_moves = sum(len(m) for m in walks.values())

    # The worker runs throughout, on its own connection; every event id it applies is recorded,
    # to prove that each event took effect exactly once.
    applied_ids: list[int] = []

    def on_batch(result: BatchResult) -> None:
        applied_ids.extend(result.event_ids)

    worker = Worker(make_settings(db, batch_size=batch_size), db, on_batch=on_batch)
    worker_errors: list[BaseException] = []

    def run_worker() -> None:
        try:
            worker.run()
        except BaseException as exc:
            worker_errors.append(exc)

    worker_thread = threading.Thread(target=run_worker)
    worker_thread.start()
    ready: deque[uuid.UUID] = deque(rng.sample(list(walks), len(walks)))
    lock = threading.Lock()
    counts = {"committed": 0, "rolled_back": 0, "multi": 0}
    errors: list[BaseException] = []

    def take(n: int) -> list[uuid.UUID]:
        with lock:
            return [ready.popleft() for _ in range(min(n, len(ready)))]

    def give_back(variants: list[uuid.UUID]) -> None:
        with lock:
            ready.extend(v for v in variants if walks[v])

    def writer(index: int, seed: int) -> None:
        wrng = random.Random(seed)
        kind = ("sqlalchemy-api", "psycopg-api", "plain-sql")[index % 3]
        try:
            with engine.connect() as sa, connect(db, application_name=f"writer-{index}", autocommit=False) as pg:
                while True:
                    batch = take(wrng.choice((1, 1, 1, 1, 2, 3)))  # sometimes several variants in one tx
                    if not batch:
                        with lock:
                            if not ready and not any(walks.values()):
                                return
                        time.sleep(0.001)  # another writer holds the last variants; not a race guard
                        continue
                    rollback = wrng.random() < 0.03
                    moves = [(v, walks[v][0]) for v in batch]
                    if kind == "sqlalchemy-api":
                        tx = sa.begin()
                        for variant, (status, step) in moves:
                            outbox.update_variant(sa, variant, status=status, step=step)
                        tx.rollback() if rollback else tx.commit()
                    else:
                        for variant, (status, step) in moves:
                            if kind == "psycopg-api":
                                outbox.update_variant(pg, variant, status=status, step=step)
                            else:
                                pg.execute(PLAIN_SQL, {"status": status, "step": step, "variant_id": variant})
                        pg.rollback() if rollback else pg.commit()
                    with lock:
                        if rollback:
                            counts["rolled_back"] += 1
                        else:
                            counts["committed"] += len(batch)
                            counts["multi"] += len(batch) > 1
                            for variant in batch:
                                walks[variant].popleft()
                    give_back(batch)
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=writer, args=(i, rng.random())) for i in range(writers)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[0]
        writing = time.monotonic() - started
        with connect(db, application_name="checker") as conn:
            applied_while_writing = len(applied_ids)
            wait_for(lambda: pending_work(conn) == 0, timeout=120, what="the worker to drain")
            drained = time.monotonic() - started
            worker.stop()
            worker_thread.join(timeout=30)
            assert not worker_errors, worker_errors[0]

            expected = reference_job_states(conn, STEPS)
            actual = actual_job_states(conn)
            all_ids = [row[0] for row in conn.execute("SELECT event_id FROM outbox_events").fetchall()]
            (applied,) = conn.execute("SELECT events_applied FROM outbox_checkpoints").fetchone()
            dirty = conn.execute("SELECT count(*) FROM outbox_dirty_jobs").fetchone()[0]
    finally:
        worker.stop()
        worker_thread.join(timeout=30)

    assert counts["committed"] == total_moves
    assert actual == expected
    stuck = [j for j, (status, _) in expected.items() if status == "done" and actual[j][0] != "done"]
    assert not stuck
    assert sum(1 for status, _ in expected.values() if status == "done") >= jobs // 3
    assert sorted(applied_ids) == sorted(all_ids)  # every event applied, none twice
    assert len(set(applied_ids)) == len(applied_ids)
    assert applied == len(all_ids)  # and counted exactly once by the checkpoint
    assert dirty == 0
    assert applied_while_writing > 0  # the worker was applying while the writers wrote
    print(
        f"\nstress: {jobs} jobs, {len(walks)} variants, {counts['committed']} variant updates "
        f"({counts['multi']} multi-variant transactions, {counts['rolled_back']} rolled back) from {writers} "
        f"writers in {writing:.1f} s; batch size {batch_size}; {applied_while_writing} of {len(all_ids)} events "
        f"applied while writing; "
        f"drained {drained - writing:.2f} s after the last write"
    )
