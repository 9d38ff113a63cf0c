"""Apply one batch of events: fold them into job state and move the checkpoint, atomically."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from processor import store
from processor.decode import DeadLetter, EventRow, decode_event
from processor.fold import FailurePolicy, JobState, Pipeline, UnknownStepError, VariantState, fold_job
from processor.store import Connection, Position

log = logging.getLogger(__name__)


class FencedError(RuntimeError):
    """The checkpoint moved under this worker: another consumer applied events; apply nothing."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    events: int
    jobs_changed: int
    dead_letters: int
    position: Position
    committed_at: dt.datetime
    # Seconds from each event's write to the commit of the job state it produced (database clock).
    latencies: list[float] = field(repr=False)


@dataclass(frozen=True, slots=True)
class FoldOutcome:
    changes: list[tuple[VariantState, int]]
    dead_letters: list[DeadLetter]


def decode_batch(events: Sequence[EventRow], pipeline: Pipeline) -> FoldOutcome:
    """Decode a batch, keep each variant's newest change, and set aside what cannot apply."""
    latest: dict[uuid.UUID, tuple[VariantState, int]] = {}
    dead: list[DeadLetter] = []
    for event in events:
        decoded = decode_event(event, pipeline)
        if isinstance(decoded, DeadLetter):
            dead.append(decoded)
            continue
        known = latest.get(decoded.variant_id)
        if known is None or decoded.sort_key() > known[0].sort_key():
            latest[decoded.variant_id] = (decoded, event.event_id)
    return FoldOutcome(list(latest.values()), dead)


def apply_batch(
    conn: Connection,
    *,
    partition: int,
    expected: Position,
    events: Sequence[EventRow],
    pipeline: Pipeline,
    policy: FailurePolicy,
    before_commit: Callable[[], None] | None = None,
) -> BatchResult:
    """Apply ``events`` (read after ``expected``) in one transaction with the checkpoint move.

    Redelivery is harmless twice over: the checkpoint is compared under its row lock (so a batch
    already applied is refused), and variant states only move to a higher version.
    """
    assert events, "apply_batch needs at least one event"
    outcome = decode_batch(events, pipeline)
    last = Position.of(events[-1])
    with conn.transaction():
        # The row lock on the checkpoint fences every other consumer of this partition until
        # commit; the comparison refuses a batch that another consumer already moved past.
        current = store.checkpoint_lock(conn, partition)
        if current != expected:
            raise FencedError(
                f"checkpoint of partition {partition} moved from {expected} to {current} under this worker"
            )
        affected = store.variant_states_upsert(conn, outcome.changes)
        job_states = _fold_jobs(store.variant_states_for_jobs(conn, affected), pipeline, policy)
        result = store.batch_commit(conn, partition, job_states, outcome.dead_letters, last, len(events))
        if before_commit is not None:
            before_commit()  # test hook: a crash placed here must leave no trace
    for letter in outcome.dead_letters:
        log.warning("event %s parked as a dead letter (job %s): %s", letter.event_id, letter.job_id, letter.reason)
    return BatchResult(
        events=len(events),
        jobs_changed=result.jobs_changed,
        dead_letters=result.dead_letters,
        position=last,
        committed_at=result.committed_at,
        latencies=[(result.committed_at - e.created_at).total_seconds() for e in events],
    )


def _fold_jobs(
    states_by_job: dict[uuid.UUID, list[VariantState]], pipeline: Pipeline, policy: FailurePolicy
) -> dict[uuid.UUID, JobState]:
    jobs: dict[uuid.UUID, JobState] = {}
    for job_id, states in states_by_job.items():
        try:
            state = fold_job(states, pipeline, policy)
        except UnknownStepError as exc:
            # Only stored states from before a pipeline change can get here (new events with an
            # unknown step are dead-lettered, and the worker refuses to start on such states).
            log.error("job %s left unchanged: %s", job_id, exc)
            continue
        if state is not None:
            jobs[job_id] = state
    return jobs
