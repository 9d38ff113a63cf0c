"""Apply events to job state in transactions that also move the checkpoint."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from processor import store
from processor.decode import DeadLetter, EventRow, decode_event
from processor.fold import FailurePolicy, JobState, Pipeline, UnfoldableJobError, VariantState, fold_job
from processor.snapshot import Cursor
from processor.store import Connection

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FoldContext:
    """What every batch of one worker shares: its partition and how it folds."""

    partition: int
    pipeline: Pipeline
    policy: FailurePolicy


class FencedError(RuntimeError):
    """The checkpoint moved under this worker: another consumer applied events; apply nothing."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    partition: int
    events: int
    jobs_changed: int
    dead_letters: int
    cursor: Cursor
    committed_at: dt.datetime
    # Every event of the transactions the batch covers was applied (no more after it for now).
    complete: bool = True
    # The jobs were queued in outbox_dirty_jobs, to be folded once the catch-up is complete.
    deferred: bool = False
    event_ids: list[int] = field(default_factory=list, repr=False)
    # Seconds from each event's write to the commit of this batch (database clock).
    latencies: list[float] = field(default_factory=list, repr=False)


def decode_batch(events: Sequence[EventRow]) -> tuple[list[tuple[VariantState, int]], list[DeadLetter]]:
    """Decode a batch: each variant's newest state (with its event id), and the dead letters."""
    latest: dict[uuid.UUID, tuple[VariantState, int]] = {}
    dead: list[DeadLetter] = []
    for event in events:
        decoded = decode_event(event)
        if decoded.dead_letter is not None:
            dead.append(decoded.dead_letter)
        state = decoded.state
        if state is None:
            continue
        known = latest.get(state.variant_id)
        if known is None or state.sort_key() > known[0].sort_key():
            latest[state.variant_id] = (state, event.event_id)
    return list(latest.values()), dead


@dataclass(frozen=True, slots=True)
class FoldedJobs:
    """New job states; jobs folded without error (their flags are cleared); jobs to flag, and why."""

    states: dict[uuid.UUID, JobState] = field(default_factory=dict)
    folded: list[uuid.UUID] = field(default_factory=list)
    flags: dict[uuid.UUID, str] = field(default_factory=dict)


def fold_jobs(
    job_ids: Iterable[uuid.UUID], states_by_job: dict[uuid.UUID, list[VariantState]], ctx: FoldContext
) -> FoldedJobs:
    """Fold each job; a job that cannot be folded is flagged with the reason instead."""
    result = FoldedJobs()
    for job_id in job_ids:
        try:
            state = fold_job(states_by_job.get(job_id, []), ctx.pipeline, ctx.policy)
        except UnfoldableJobError as exc:
            result.flags[job_id] = str(exc)
            continue
        result.folded.append(job_id)
        if state is not None:
            result.states[job_id] = state
    return result


def _fence(conn: Connection, partition: int, expected: Cursor) -> None:
    # The row lock on the checkpoint fences every other consumer of this partition until commit;
    # the comparison refuses to apply anything if another consumer moved it meanwhile.
    current = store.checkpoint_lock(conn, partition)
    if current != expected:
        raise FencedError(f"checkpoint of partition {partition} moved under this worker (now {current})")


def apply_batch(
    conn: Connection,
    ctx: FoldContext,
    *,
    expected: Cursor,
    limit: int,
    dirty: bool = False,
    before_commit: Callable[[], None] | None = None,
) -> BatchResult:
    """Apply the next events after ``expected`` (up to ``limit``) and move the checkpoint past them, atomically.

    Jobs are folded at once only when the batch is a whole catch-up (every event committed so far)
    and no jobs wait to be folded (``dirty``); otherwise they are queued in outbox_dirty_jobs and
    folded once the catch-up is complete, so that no job shows a state between two committed
    snapshots. Redelivery is harmless twice over: a checkpoint that moved is refused, and variant
    states only move to a higher version.
    """
    partition = ctx.partition
    with conn.transaction():
        _fence(conn, partition, expected)
        applied = store.events_apply(conn, partition, expected, limit)
        complete = applied.count < limit
        if complete:
            new = expected.caught_up_to(applied.target)
        else:
            assert applied.last is not None
            new = expected.partway_to(applied.target, applied.last)
        defer = dirty or not complete or expected.target is not None
        # The events the statement could not read (rare): problem states and dead letters.
        changes, dead = decode_batch(store.events_get(conn, applied.unreadable)) if applied.unreadable else ([], [])
        affected = store.variant_states_upsert(conn, partition, changes, defer=defer)
        if defer:
            if applied.moved_from:
                store.dirty_jobs_add(conn, partition, applied.moved_from)
            if complete:
                # The catch-up is complete: every job it touched is folded now, from its complete state.
                store.dirty_jobs_add_applied(conn, partition, expected.done, new.done)
            jobs = FoldedJobs()
        else:
            affected.update(applied.jobs)
            jobs = fold_jobs(affected, store.variant_states_to_fold(conn, affected), ctx) if affected else FoldedJobs()
        result = store.batch_commit(
            conn,
            partition,
            jobs=jobs.states,
            folded=jobs.folded,
            flags=jobs.flags,
            dead_letters=dead,
            cursor=new,
            event_count=applied.count,
            last_event_id=applied.event_ids[-1] if applied.event_ids else None,
        )
        if before_commit is not None:
            before_commit()  # test hook: a crash placed here must leave no trace
    _log_outcome(dead, jobs.flags)
    committed = result.committed_at.timestamp()
    return BatchResult(
        partition=partition,
        events=applied.count,
        jobs_changed=result.jobs_changed,
        dead_letters=result.dead_letters,
        cursor=new,
        committed_at=result.committed_at,
        complete=complete,
        deferred=defer,
        event_ids=applied.event_ids,
        latencies=[committed - created for created in applied.created_at],
    )


def write_jobs(conn: Connection, ctx: FoldContext, jobs: FoldedJobs, cursor: Cursor) -> store.CommitResult:
    """Write folded job states and flags, leaving the checkpoint where it is (``cursor``)."""
    result = store.batch_commit(
        conn, ctx.partition, jobs=jobs.states, folded=jobs.folded, flags=jobs.flags,
        dead_letters=[], cursor=cursor, event_count=0,
    )  # fmt: skip
    _log_outcome([], jobs.flags)
    return result


def fold_and_write_jobs(
    conn: Connection, ctx: FoldContext, job_ids: Iterable[uuid.UUID], cursor: Cursor
) -> store.CommitResult:
    """Fold ``job_ids`` from the stored variant states and write them (inside the caller's transaction)."""
    job_ids = list(job_ids)
    return write_jobs(conn, ctx, fold_jobs(job_ids, store.variant_states_to_fold(conn, job_ids), ctx), cursor)


def refold_dirty_jobs(conn: Connection, ctx: FoldContext, *, cursor: Cursor, limit: int) -> tuple[int, int]:
    """Fold up to ``limit`` jobs left by a completed catch-up; return (jobs taken, jobs changed)."""
    with conn.transaction():
        _fence(conn, ctx.partition, cursor)
        job_ids = store.dirty_jobs_take(conn, ctx.partition, limit)
        result = fold_and_write_jobs(conn, ctx, job_ids, cursor)
    return len(job_ids), result.jobs_changed


def _log_outcome(dead: Sequence[DeadLetter], flags: dict[uuid.UUID, str]) -> None:
    for letter in dead:
        log.warning("event %s parked as a dead letter (job %s): %s", letter.event_id, letter.job_id, letter.reason)
    for job_id, reason in flags.items():
        log.error("job %s flagged, its state left unchanged: %s", job_id, reason)
