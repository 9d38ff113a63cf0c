"""`outbox replay`: rebuild job state from the outbox (and the baseline that prune keeps).

Each chunk of jobs is one transaction that first locks the partition's checkpoint row: the worker
waits for it, and the replay sees exactly the events the worker has applied. So replaying while
the worker runs and writers write loses nothing and applies nothing twice, and its result is what
live processing gives.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg

from processor import store
from processor.batch import FoldContext, fold_jobs, write_jobs
from processor.decode import decode_event
from processor.fold import VariantState
from processor.store import Connection

JobRow = tuple[str | None, str | None]


@dataclass(frozen=True, slots=True)
class JobChange:
    job_id: uuid.UUID
    before: JobRow | None
    after: JobRow | None

    def describe(self) -> str:
        def show(row: JobRow | None) -> str:
            return "-" if row is None else f"{row[0]}/{row[1]}"

        return f"{self.job_id}: {show(self.before)} -> {show(self.after)}"


def rebuild_jobs(conn: Connection, ctx: FoldContext, job_ids: Sequence[uuid.UUID], *, dry_run: bool) -> list[JobChange]:
    """Recompute the jobs' variant states from the baseline and applied events, fold, and write."""
    changes: list[JobChange] = []
    with conn.transaction() as tx:
        cursor = store.checkpoint_lock(conn, ctx.partition)  # the worker waits until this commits
        variant_ids = store.replay_variants_of_jobs(conn, job_ids)
        latest: dict[uuid.UUID, tuple[VariantState, int]] = {}
        candidates = store.variant_baseline_get(conn, variant_ids)
        for event in store.replay_latest_events(conn, ctx.partition, cursor, variant_ids):
            decoded = decode_event(event).state  # a dead letter is already recorded
            if decoded is not None:
                candidates.append((decoded, event.event_id))
        for state, event_id in candidates:
            known = latest.get(state.variant_id)
            if known is None or state.sort_key() > known[0].sort_key():
                latest[state.variant_id] = (state, event_id)
        store.variant_states_replace(conn, variant_ids, list(latest.values()))

        # Every job a rebuilt variant belongs (or belonged) to is folded from all of its stored
        # variants, not only the rebuilt ones: a variant may have moved to a job not being replayed.
        affected = sorted(set(job_ids) | {state.job_id for state, _ in latest.values()})
        folded = fold_jobs(affected, store.variant_states_to_fold(conn, affected), ctx)
        before = store.jobs_get(conn, affected)
        for job_id, job_state in folded.states.items():
            after = (job_state.status.value, job_state.current_step)
            if job_id in before and before[job_id] != after:
                changes.append(JobChange(job_id, before[job_id], after))
        if dry_run:
            raise psycopg.Rollback(tx)
        if cursor.target is None:
            write_jobs(conn, ctx, folded, cursor)
        else:
            # A catch-up is in progress: fold when it completes, like the worker would. What is
            # reported is what the jobs will become then.
            store.dirty_jobs_add(conn, ctx.partition, affected)
    return changes


def replay(
    conn: Connection,
    ctx: FoldContext,
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
        changes.extend(rebuild_jobs(conn, ctx, chunk, dry_run=dry_run))
        if on_chunk is not None:
            on_chunk(len(chunk))
    return changes
