"""kill -9 soak: the active worker is SIGKILLed again and again, at random points and between
applying a batch and committing it, while 8 writers write; every event still takes effect once."""

from __future__ import annotations

import itertools
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from processor import workload
from processor.database import connect
from tests.fix_database import make_settings, subprocess_env
from tests.helpers import drain, pending_work
from tests.reference import actual_job_states, reference_job_states

STEPS = workload.STEPS
ROOT = Path(__file__).parents[2]
# Each checkpoint move, with where it started, where it ended and how many events it counted: the
# chain must be unbroken (no batch applied from a stale checkpoint) and add up to every event.
AUDIT = """
CREATE TABLE checkpoint_moves (
    id bigserial PRIMARY KEY,
    old_done text, old_target text, old_after text,
    new_done text, new_target text, new_after text,
    events bigint
);
CREATE FUNCTION audit_checkpoint_move() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO checkpoint_moves (old_done, old_target, old_after, new_done, new_target, new_after, events)
    VALUES (OLD.done_snapshot::text, OLD.target_snapshot::text, OLD.last_txid || '/' || OLD.last_event_id,
            NEW.done_snapshot::text, NEW.target_snapshot::text, NEW.last_txid || '/' || NEW.last_event_id,
            NEW.events_applied - OLD.events_applied);
    RETURN NEW;
END $$;
CREATE TRIGGER audit_checkpoint_move AFTER UPDATE ON outbox_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_checkpoint_move();
"""
WRITERS = 8


def test_kill_9_soak(db, engine, tmp_path):
    rng = random.Random(99)
    with connect(db, application_name="setup") as conn:
        conn.execute(AUDIT)
    with engine.begin() as conn:
        jobs = workload.create_jobs(conn, 300, rng, variants=(3, 12))
    variants = [v for ids in jobs.values() for v in ids]
    started = time.monotonic()
    with workload.UpdateWriters(db, variants, writers=WRITERS, seed=rng.random()) as writers:
        kills = kill_the_active_worker_until_enough(db, tmp_path, rng, writers, started)
    assert not writers.errors, writers.errors[0]
    soak = time.monotonic() - started
    with connect(db, application_name="checker") as conn:
        applied_during_soak = conn.execute("SELECT events_applied FROM outbox_checkpoints").fetchone()[0]
    assert applied_during_soak > 0

    drain(make_settings(db))
    with connect(db, application_name="checker") as conn:
        assert pending_work(conn) == 0
        total, moves = check_the_checkpoint_chain_counts_every_event_once(conn)
        assert actual_job_states(conn) == reference_job_states(conn, STEPS)
    print(
        f"\nkill -9 soak: {total} events from {WRITERS} writers in {soak:.1f} s, {applied_during_soak} applied "
        f"during it; {sum(kills.values())} SIGKILLs of the active worker ({kills['by the test']} at random points, "
        f"{kills['before commit']} between applying a batch and committing it); {moves} checkpoint moves, "
        "chain unbroken, every event counted once, final state equal to the reference"
    )


def kill_the_active_worker_until_enough(
    db, tmp_path: Path, rng: random.Random, writers: workload.UpdateWriters, started: float
) -> dict[str, int]:
    """Start crashing workers one after another, SIGKILL each at a random point unless it crashed itself
    between applying a batch and committing it; until 30 kills, 10 of them before commit, and 20,000 writes."""
    env = subprocess_env(db, CRASH_PROBABILITY="0.03", OUTBOX_BATCH_SIZE="100", OUTBOX_STANDBY_INTERVAL="0.05")
    kills = {"by the test": 0, "before commit": 0}
    with open(tmp_path / "workers.log", "wb") as log:
        while sum(kills.values()) < 30 or kills["before commit"] < 10 or writers.written < 20_000:
            worker = subprocess.Popen(
                [sys.executable, "-m", "tests.reliability.crashing_worker"],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=log,
            )
            wait_until_started(worker)
            try:
                code = worker.wait(timeout=rng.uniform(0.5, 2.5))
            except subprocess.TimeoutExpired:
                worker.send_signal(signal.SIGKILL)
                worker.wait()
                kills["by the test"] += 1
                continue
            assert code == -signal.SIGKILL, (tmp_path / "workers.log").read_text()[-3000:]
            kills["before commit"] += 1
            assert time.monotonic() - started < 600, "soak did not reach its counts in time"
    return kills


def wait_until_started(worker: subprocess.Popen[bytes]) -> None:
    """Wait for the worker's "started" line (its imports and settings done): the kill window starts there."""
    assert worker.stdout is not None
    ready, _, _ = select.select([worker.stdout], [], [], 60)
    assert ready and worker.stdout.readline().strip() == b"started", "the crashing worker did not start"
    worker.stdout.close()  # it writes nothing else there; its logs go to workers.log


def check_the_checkpoint_chain_counts_every_event_once(conn) -> tuple[int, int]:
    """Each move starts where the previous ended; the moves' counts add up to every event. Returns
    (events, moves)."""
    total = conn.execute("SELECT count(*) FROM outbox_events").fetchone()[0]
    moves = conn.execute(
        "SELECT old_done, old_target, old_after, new_done, new_target, new_after, events "
        "FROM checkpoint_moves ORDER BY id"
    ).fetchall()
    for previous, move in itertools.pairwise(moves):
        assert move[:3] == previous[3:6], "a batch was applied from a checkpoint that had moved"
    assert (
        sum(move[6] for move in moves)
        == total
        == conn.execute("SELECT events_applied FROM outbox_checkpoints").fetchone()[0]
    )
    return total, len(moves)
