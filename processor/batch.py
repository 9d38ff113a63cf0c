"""Apply events to job state in transactions that also move the checkpoint."""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import psycopg

from processor import store, tracing
from processor.decode import DeadLetter, EventRow, decode_event
from processor.errors import FencedError, FoldConfigChangedError, UnfoldableJobError
from processor.fold import FailurePolicy, JobState, Pipeline, VariantState, fold_job, newest_states
from processor.fold_config import FoldConfig
from processor.snapshot import Cursor
from processor.store import Connection

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FoldContext:
    """What every batch of one worker shares: its partition and how it folds (the database's configuration)."""

    partition: int
    config: FoldConfig

    @property
    def pipeline(self) -> Pipeline:
        return self.config.pipeline

    @property
    def policy(self) -> FailurePolicy:
        return self.config.policy


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
    # Jobs await their fold in outbox_dirty_jobs (until the catch-up is complete, or their row is free).
    awaiting_fold: bool = False
    event_ids: list[int] = field(default_factory=list, repr=False)
    # Seconds from each event's write to the commit of this batch (database clock).
    latencies: list[float] = field(default_factory=list, repr=False)
    # The status each job changed was given, one per job (metrics by to_status; counted only there).
    job_statuses: Sequence[str] = field(default=(), repr=False)


def decode_batch(events: Sequence[EventRow]) -> tuple[list[tuple[VariantState, int]], list[DeadLetter]]:
    """Decode events into each variant's newest state (with its event id) and dead letters."""
    states: list[tuple[VariantState, int]] = []
    dead: list[DeadLetter] = []
    for event in events:
        decoded = decode_event(event)
        if decoded.dead_letter is not None:
            dead.append(decoded.dead_letter)
        if decoded.state is not None:
            states.append((decoded.state, event.event_id))
    return list(newest_states(states).values()), dead


@dataclass(frozen=True, slots=True)
class FoldedJobs:
    """New job states; jobs folded without error (their flags are cleared); jobs to flag, and why."""

    states: dict[uuid.UUID, JobState] = field(default_factory=dict)
    folded: list[uuid.UUID] = field(default_factory=list)
    flags: dict[uuid.UUID, str] = field(default_factory=dict)


def fold_jobs(
    job_ids: Iterable[uuid.UUID], states_by_job: dict[uuid.UUID, list[VariantState]], config: FoldConfig
) -> FoldedJobs:
    """Fold each job; a job that cannot be folded is flagged with the reason instead."""
    result = FoldedJobs()
    for job_id in job_ids:
        try:
            state = fold_job(states_by_job.get(job_id, []), config.pipeline, config.policy)
        except UnfoldableJobError as exc:
            result.flags[job_id] = str(exc)
            continue
        result.folded.append(job_id)
        if state is not None:
            result.states[job_id] = state
    return result


def _fence(conn: Connection, ctx: FoldContext, expected: Cursor) -> None:
    # The row lock on the checkpoint fences every other consumer of this partition until commit;
    # the comparison refuses to apply anything if another consumer moved it meanwhile, or if the
    # fold configuration changed (stamped on the row by `outbox pipeline set`, under its lock).
    locked = store.checkpoint_lock(conn, ctx.partition)
    if locked.fold_config_version != ctx.config.version:
        raise FoldConfigChangedError(
            f"the fold configuration changed (version {ctx.config.version} -> {locked.fold_config_version})"
        )
    if locked.cursor != expected:
        raise FencedError(f"checkpoint of partition {ctx.partition} moved under this worker (now {locked.cursor})")


def apply_batch(
    conn: Connection,
    ctx: FoldContext,
    *,
    expected: Cursor,
    limit: int,
    awaiting_fold: bool = False,
    before_commit: Callable[[], None] | None = None,
) -> BatchResult:
    """Apply the next events after ``expected`` (up to ``limit``) and move the checkpoint past them, atomically.

    Jobs are folded at once only when the batch is a whole catch-up (every event committed so far)
    and no jobs await their fold already (``dirty``); otherwise they await it in outbox_dirty_jobs
    until the catch-up is complete, so that no job shows a state between two committed snapshots.
    Redelivery is harmless twice over: a checkpoint that moved is refused, and variant states only
    move to a newer version.
    """
    partition = ctx.partition
    # The batch's span (a no-op without an OpenTelemetry SDK) ends after the commit.
    with tracing.batch_span(partition) as span, conn.transaction():
        _fence(conn, ctx, expected)
        applied = store.events_apply(conn, partition, expected, limit)
        tracing.link_events(span, applied.trace_parents.values())
        complete = applied.count < limit
        if complete:
            new = expected.caught_up_to(applied.target)
        else:
            assert applied.last is not None
            new = expected.partway_to(applied.target, applied.last)
        awaiting_fold = awaiting_fold or not complete or expected.target is not None
        # The events the statement could not read (rare): problem states and dead letters.
        changes, dead = decode_batch(store.events_get(conn, applied.unreadable)) if applied.unreadable else ([], [])
        parked = store.dead_letters_park(conn, partition, dead) if dead else 0
        affected = store.variant_states_upsert(conn, partition, changes, awaiting_fold=awaiting_fold)
        # A dead letter that holds its job (no place in its variant's order) flags it, through the fold.
        affected.update(d.job_id for d in dead if d.holds_job and d.job_id is not None and not awaiting_fold)
        if awaiting_fold:
            if applied.moved_from:
                store.jobs_awaiting_fold_add(conn, partition, applied.moved_from)
            if complete:
                # The catch-up is complete: every job it touched is folded now, from its complete state.
                store.jobs_awaiting_fold_add_applied(conn, partition, expected.done, new.done)
            jobs = FoldedJobs()
        else:
            affected.update(applied.jobs)
            jobs = (
                fold_jobs(affected, store.variant_states_to_fold(conn, affected), ctx.config)
                if affected
                else FoldedJobs()
            )
        written = (
            store.jobs_write(conn, jobs=jobs.states, flags=jobs.flags, folded=jobs.folded)
            if jobs.folded or jobs.flags
            else store.JobsWritten.nothing()
        )
        result = store.batch_commit(
            conn,
            partition,
            cursor=new,
            event_count=applied.count,
            last_event_id=applied.event_ids[-1] if applied.event_ids else None,
        )
        # Last: it takes the lock that orders transitions, held until the commit (also publishes
        # what holds staged, during a long catch-up too).
        store.transitions_append(conn, written, trace_parents=applied.trace_parents)
        tracing.batch_outcome(span, events=applied.count, jobs_changed=written.jobs_changed, dead_letters=parked)
        if before_commit is not None:
            before_commit()  # test hook: a crash placed here must leave no trace
    _log_outcome(dead, jobs.flags, written.jobs_blocked, conn)
    committed = result.committed_at.timestamp()
    return BatchResult(
        partition=partition,
        events=applied.count,
        jobs_changed=written.jobs_changed,
        dead_letters=parked,
        cursor=new,
        committed_at=result.committed_at,
        complete=complete,
        awaiting_fold=awaiting_fold or bool(written.jobs_blocked),
        event_ids=applied.event_ids,
        latencies=[committed - created for created in applied.created_at],
        job_statuses=written.to_statuses,
    )


def write_jobs(conn: Connection, jobs: FoldedJobs, *, catching_up_partitions: Iterable[int] = ()) -> store.JobsWritten:
    """Write folded job states and flags outside a batch (jobs of ``catching_up_partitions`` await the catch-up)."""
    written = store.jobs_write(
        conn, jobs=jobs.states, flags=jobs.flags, folded=jobs.folded, catching_up_partitions=catching_up_partitions
    )
    if written.jobs_changed:
        # Operations hold every checkpoint: their transitions are written at once, not at the end.
        store.transitions_append(conn, written)
    _log_outcome([], jobs.flags, written.jobs_blocked, conn)
    return written


def fold_and_write_jobs(
    conn: Connection, config: FoldConfig, job_ids: Iterable[uuid.UUID], *, catching_up_partitions: Iterable[int] = ()
) -> store.JobsWritten:
    """Fold ``job_ids`` from the stored variant states and write them (inside the caller's transaction)."""
    job_ids = list(job_ids)
    folded = fold_jobs(job_ids, store.variant_states_to_fold(conn, job_ids), config)
    return write_jobs(conn, folded, catching_up_partitions=catching_up_partitions)


@dataclass(frozen=True, slots=True)
class Refolded:
    taken: int
    jobs_changed: int
    next_retry_in: float | None  # seconds until a job whose row was locked is due again
    job_statuses: Sequence[str] = ()  # the status each job changed was given (as BatchResult's)


def fold_awaiting_jobs(conn: Connection, ctx: FoldContext, *, cursor: Cursor, limit: int) -> Refolded:
    """Fold up to ``limit`` jobs awaiting fold (a closed catch-up's, or ones whose row was locked)."""
    with conn.transaction():
        _fence(conn, ctx, cursor)
        taken = store.jobs_awaiting_fold_take(conn, ctx.partition, limit)
        written = fold_and_write_jobs(conn, ctx.config, taken.job_ids)
    return Refolded(
        len(taken.job_ids),
        written.jobs_changed,
        taken.next_retry_in if not written.jobs_blocked else 1.0,
        written.to_statuses,
    )


def _log_outcome(
    dead: Sequence[DeadLetter], flags: dict[uuid.UUID, str], blocked: Sequence[uuid.UUID], conn: Connection
) -> None:
    for letter in dead:
        log.warning("event %s parked as a dead letter (job %s): %s", letter.event_id, letter.job_id, letter.reason)
    for job_id, reason in flags.items():
        log.error("job %s flagged, its state left unchanged: %s", job_id, reason)
    if blocked:
        _log_blocked(conn, blocked)


_BLOCKED_LOG_EVERY = 30.0  # seconds: a job that stays locked is named again this often
_blocked_logged: dict[uuid.UUID, float] = {}


def _log_blocked(conn: Connection, blocked: Sequence[uuid.UUID]) -> None:
    """Name each locked job and who holds its row (again every 30 s while it stays locked)."""
    now = time.monotonic()
    for job, at in list(_blocked_logged.items()):
        if now - at > _BLOCKED_LOG_EVERY:
            del _blocked_logged[job]
    fresh = [job for job in blocked if job not in _blocked_logged]
    _blocked_logged.update(dict.fromkeys(fresh, now))
    if not fresh:
        return
    try:
        with conn.transaction():  # a savepoint inside an operation's transaction
            holders = store.jobs_lock_holders(conn, fresh[:20])
    except psycopg.Error:  # the description is best effort; the job is retried whatever happens here
        holders = []
    for holder in holders:
        log.warning(
            "job %s: its row in jobs is locked by %s; its state is written once the lock is released, "
            "the other jobs go on",
            holder.job_id,
            holder.describe(),
        )
    if len(fresh) > len(holders):
        log.warning(
            "%s more job rows locked by other transactions; tried again every second", len(fresh) - len(holders)
        )
