"""`outbox replay`: rebuild job state from the outbox (and the baseline that prune keeps).

Each chunk of jobs is one transaction that first locks every partition's checkpoint row, in
partition order (store.checkpoints_lock_all): the workers wait for it between two batches,
`outbox repartition` and the other operations wait for it, and it waits for them. Inside, a variant
is rebuilt from its baseline and from its applied events in every partition (a variant that moved
between jobs of two partitions has events in both), each judged by its own partition's checkpoint:
the same newest state live processing keeps, computed by the same rule
(outbox_variant_states_newest). So a replay while workers run, writers write, and a repartition or
a prune happens, loses nothing, applies nothing twice, and gives what live processing gives.

Dead-letter retry and discard, `verify --repair` and the rebuild after a restore go through
``rebuild_jobs`` too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg

from processor import fold_config, store
from processor.batch import fold_jobs, write_jobs
from processor.store import Connection


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A job row's state: its status at its step."""

    status: str | None
    current_step: str | None

    def describe(self) -> str:
        return f"{self.status}/{self.current_step}"


@dataclass(frozen=True, slots=True)
class JobChange:
    job_id: uuid.UUID
    before: JobStatus | None
    after: JobStatus | None

    def describe(self) -> str:
        def show(state: JobStatus | None) -> str:
            return "-" if state is None else state.describe()

        return f"{self.job_id}: {show(self.before)} -> {show(self.after)}"


def rebuild_jobs(
    conn: Connection,
    job_ids: Sequence[uuid.UUID],
    *,
    dry_run: bool,
    variant_ids: Sequence[uuid.UUID] = (),
    before_write: Callable[[], None] | None = None,
) -> list[JobChange]:
    """Rebuild the variants of ``job_ids`` (and ``variant_ids``) from the outbox, fold every job they
    touch, and write.

    Returns the jobs whose state changes (with a catch-up open in a job's partition, it is written
    when the catch-up closes: what is returned is what it becomes then). A held job's row is left
    as its hold set it, and is not among them.
    """
    changes: list[JobChange] = []
    with conn.transaction() as tx:
        checkpoints = store.checkpoints_lock_all(conn)  # workers, repartition and other operations wait
        config = fold_config.load(conn)  # cannot change while the checkpoints are held
        variant_ids = sorted(set(store.replay_variants_of_jobs(conn, job_ids)) | set(variant_ids))
        # Every job a rebuilt variant belongs or belonged to is folded from all of its stored
        # variants: a variant may have moved to or from a job not being replayed.
        touched = store.variant_states_rebuild(conn, variant_ids) if variant_ids else set()
        affected = sorted(set(job_ids) | touched)
        folded = fold_jobs(affected, store.variant_states_to_fold(conn, affected), config)
        before = store.jobs_get(conn, affected)
        held = store.job_holds(conn, affected)  # their rows are the application's: not written
        for job_id, job_state in folded.states.items():
            after = JobStatus(job_state.status.value, job_state.current_step)
            stored = before.get(job_id)
            if stored is None or job_id in held:
                continue
            was = JobStatus(stored.status, stored.current_step)
            if was != after:
                changes.append(JobChange(job_id, was, after))
        if dry_run:
            raise psycopg.Rollback(tx)
        if before_write is not None:
            before_write()  # test hook
        catching_up = [p for p, locked in checkpoints.items() if locked.cursor.target is not None]
        write_jobs(conn, folded, catching_up_partitions=catching_up)
    return changes


def replay(
    conn: Connection,
    job_ids: Sequence[uuid.UUID],
    *,
    dry_run: bool,
    chunk_size: int = 500,
    on_chunk: Callable[[int], None] | None = None,
) -> list[JobChange]:
    """Rebuild ``job_ids`` in chunks (each its own short transaction); return the jobs that change."""
    changes: list[JobChange] = []
    for start in range(0, len(job_ids), chunk_size):
        chunk = job_ids[start : start + chunk_size]
        changes.extend(rebuild_jobs(conn, chunk, dry_run=dry_run))
        if on_chunk is not None:
            on_chunk(len(chunk))
    return changes
