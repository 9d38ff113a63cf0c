"""Small helpers shared by integration and acceptance tests."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import psycopg

from processor.settings import Settings
from processor.worker import Worker, WorkerStats


def drain(settings: Settings) -> WorkerStats:
    """Run a worker until nothing more can be processed right now."""
    return Worker(settings, settings.database()).run(until_idle=True)


def wait_for(condition: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds.

    For waiting on another process (a worker subprocess) to reach a state, never to order a race.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


async def wait_for_async(condition: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition") -> Any:
    """As ``wait_for``, in an event loop (which stays free meanwhile); ``condition`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


# 2,000 jobs of 10 variants created through capture: 20,000 events (in one transaction if run in one).
JOBS_OF_TEN_VARIANTS = """
INSERT INTO jobs (job_id, status) SELECT gen_random_uuid(), 'queued' FROM generate_series(1, 2000);
INSERT INTO jobs_variants (job_variants_id, job_id, status)
    SELECT gen_random_uuid(), job_id, 'queued' FROM jobs, generate_series(1, 10);
"""

# A backlog of about 54,000 events in 2,000 jobs (a drain takes a few batches of 20,000).
BACKLOG = (
    JOBS_OF_TEN_VARIANTS
    + """
UPDATE jobs_variants SET status = 'running', current_step = 'segment';
UPDATE jobs_variants SET status = 'done', current_step = 'iou_eval' WHERE random() < 0.7;
"""
)


def job_state(conn: psycopg.Connection[Any], job_id: Any) -> tuple[str, str]:
    row = conn.execute("SELECT status, current_step FROM jobs WHERE job_id = %s", [job_id]).fetchone()
    assert row is not None
    return (row[0], row[1])


def waiting_on_lock(conn: psycopg.Connection[Any], pid: int) -> bool:
    row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return bool(row and row[0] == "Lock")


class WorkerProcess:
    """`outbox run` as a subprocess, its output in a file (a pipe could fill and block it)."""

    def __init__(self, env: dict[str, str], log_path: Any, *args: str) -> None:
        import subprocess
        import sys

        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "processor.cli", "run", "--log-level", "DEBUG", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log.close()

    def output(self) -> str:
        from pathlib import Path

        return Path(self.log_path).read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()


def pending_work(conn: psycopg.Connection[Any], partition: int | None = None) -> int:
    """Events not applied plus jobs not folded yet (of every partition by default): 0 once caught up."""
    from processor import store

    return store.work_pending(conn, partition)


def consumer_os_pid(conn: psycopg.Connection[Any], partition: int = 0) -> int | None:
    """The OS pid of the worker holding the partition (from its application_name), if any."""
    from processor import store

    holder = store.consumer_lock_holder(conn, partition)
    return int(holder.application_name.rsplit(":", 1)[1]) if holder else None


# Who wrote job state: the application_name of each session that updates `jobs`. Workers name
# themselves outbox-worker:<host>:<pid>, so tests can tell which worker applied what.
JOB_WRITES_AUDIT = """
CREATE TABLE job_writes (writer text, at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION audit_job_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_writes (writer) VALUES (current_setting('application_name'));
    RETURN NEW;
END $$;
CREATE TRIGGER audit_job_write AFTER UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION audit_job_write();
"""


def finish_jobs(engine: Any, count: int, *, variants: int = 2) -> None:
    """Create ``count`` jobs whose variants are all done at the final step (iou_eval)."""
    import outbox

    with engine.begin() as conn:
        for _ in range(count):
            _, ids = outbox.create_job(conn, variants=variants)
            for variant in ids:
                outbox.update_variant(conn, variant, status="done", step="iou_eval")


def assert_only_worker_applies(
    conn: psycopg.Connection[Any], engine: Any, worker: WorkerProcess, done_jobs: int
) -> float:
    """Finish 20 jobs, wait until applied, check that only ``worker`` wrote job state meanwhile.

    Needs JOB_WRITES_AUDIT installed. Returns the seconds from writing to applied.
    """
    since = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
    written = time.monotonic()
    finish_jobs(engine, 20, variants=3)
    wait_for(lambda: pending_work(conn) == 0, what="the active worker to apply")
    applied_in = time.monotonic() - written
    writers = {row[0] for row in conn.execute("SELECT DISTINCT writer FROM job_writes WHERE at > %s", [since])}
    assert len(writers) == 1, writers
    assert writers.pop().endswith(f":{worker.pid}")
    assert conn.execute("SELECT count(*) FROM jobs WHERE status = 'done'").fetchone()[0] == done_jobs  # type: ignore[index]
    return applied_in


def make_jobs(engine: Any, count: int, rng: Any) -> dict[Any, list[Any]]:
    """Create ``count`` queued jobs of 2 to 6 variants (``rng``: a random.Random); their variant ids by job."""
    from processor import workload

    with engine.begin() as conn:
        return workload.create_jobs(conn, count, rng, variants=(2, 6))


def fold_context(settings: Settings, partition: int = 0) -> Any:
    """How a worker folds ``partition`` (processor.batch.FoldContext): the database's fold configuration."""
    from processor import fold_config
    from processor.batch import FoldContext
    from processor.database import connect

    with connect(settings.database(), application_name="outbox-tests") as conn:
        return FoldContext(partition, fold_config.load(conn))


def job_in_partition(partition: int, partitions: int) -> Any:
    """A new job id that the documented hash puts in ``partition`` of ``partitions``."""
    import uuid

    from tests.reference import partition_of

    return next(job for job in iter(uuid.uuid4, None) if partition_of(job, partitions) == partition)


# Re-queues a variant done at a step that is not the last one onto the next step: a second UPDATE
# of the row, run by an AFTER trigger of the first.
AUTO_ADVANCE = """
CREATE FUNCTION app_auto_advance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    steps text[] := ARRAY['ingest', 'detect', 'segment', 'iou_eval'];
    next_step text := steps[array_position(steps, NEW.current_step) + 1];
BEGIN
    IF NEW.status = 'done' AND next_step IS NOT NULL THEN
        UPDATE jobs_variants SET status = 'queued', current_step = next_step
        WHERE job_variants_id = NEW.job_variants_id;
    END IF;
    RETURN NULL;
END $$;
"""


def write_jobs_behind_the_processor(conn: psycopg.Connection[Any], query: str, params: Any = ()) -> None:
    """Write job state around the processor (a corruption for it to find and repair).

    outbox_guard_job_state refuses such writes; this one says it is the processor's, as its own
    statement does.
    """
    with conn.transaction():
        conn.execute("SELECT set_config('outbox.job_writer', 'processor:13', true)")
        conn.execute(query, params)
