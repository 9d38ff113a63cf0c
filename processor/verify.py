"""`outbox verify`: compare the event-derived state with jobs_variants and jobs, and repair drift.

Everything is read in one REPEATABLE READ snapshot, so a worker running meanwhile is no drift, and
pending work (outbox_events_pending, outbox_dirty_jobs: not in job state yet, by design) is in
flight, left out. Flagged jobs are reported with their reason: their state is knowingly not
computed, so verify cannot vouch for them. Held jobs (outbox.hold_job) are listed, not compared:
their state is the application's until the hold is released.

Repairs go through the normal path, never behind the processor's back: a variant row that
disagrees with its events gets a new event carrying the row's state (the worker applies it), and a
job whose state disagrees with the fold of its variants is rebuilt by replay. What repair cannot
decide (a job held by a dead letter, a step missing from the pipeline) it says, with what to run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass

from processor import fold_config, store
from processor.batch import fold_jobs
from processor.fold_config import FoldConfig
from processor.replay import rebuild_jobs
from processor.store import Connection, JobFlag, JobHold, StuckJob, VariantDriftRow


@dataclass(frozen=True, slots=True)
class VariantSide:
    """What one side (the variant's row, or its events) says of a variant."""

    job_id: uuid.UUID | None
    status: str | None
    step: str | None


@dataclass(frozen=True, slots=True)
class VariantDrift:
    variant_id: uuid.UUID
    row: VariantSide | None  # None: no row (or a row in no job)
    events: VariantSide | None  # None: no stored state

    @classmethod
    def of(cls, found: VariantDriftRow) -> VariantDrift:
        row = None
        if found.row_job_id is not None or found.row_status is not None:
            row = VariantSide(found.row_job_id, found.row_status, found.row_step)
        events = None
        if found.state_job_id is not None:
            events = VariantSide(found.state_job_id, found.state_status, found.state_step)
        return cls(found.variant_id, row, events)


@dataclass(frozen=True, slots=True)
class JobSide:
    status: str | None
    current_step: str | None


@dataclass(frozen=True, slots=True)
class JobDrift:
    job_id: uuid.UUID
    jobs: JobSide  # the job's row
    events: JobSide  # the fold of its variants' stored states


@dataclass(frozen=True, slots=True)
class VerifyReport:
    variant_drift: tuple[VariantDrift, ...] = ()
    job_drift: tuple[JobDrift, ...] = ()
    stuck_jobs: tuple[StuckJob, ...] = ()
    flagged: tuple[JobFlag, ...] = ()
    held: tuple[JobHold, ...] = ()
    jobs_in_flight: int = 0

    @property
    def drift(self) -> bool:
        return bool(self.variant_drift or self.job_drift or self.stuck_jobs)

    @property
    def flagged_jobs(self) -> int:
        return len(self.flagged)

    @property
    def ok(self) -> bool:
        """Nothing drifted and nothing flagged: every job's state is the fold of its variants."""
        return not self.drift and not self.flagged


def verify(
    conn: Connection, partition: int | None = None, *, limit: int = 1000, chunk_size: int = 2000
) -> VerifyReport:
    """Compare, in one snapshot, every partition's state (or ``partition``'s) with jobs_variants and jobs."""
    with store.one_snapshot(conn):
        config = fold_config.load(conn)
        in_flight = store.in_flight_get(conn)
        flagged = store.job_flags_list(conn, partition, limit=limit)
        holds = store.job_holds(conn)
        variant_drift = store.variant_drift_list(conn, partition, limit=limit, in_flight_variants=in_flight.variant_ids)
        stuck = store.stuck_jobs_list(
            conn,
            partition,
            limit=limit,
            in_flight_jobs=sorted(set(in_flight.job_ids)),
            final_step=config.pipeline.final,
        )
        not_compared = {f.job_id for f in flagged} | set(holds)
        job_drift = _job_drift(
            conn, partition, config, skipped=set(in_flight.job_ids) | not_compared, limit=limit, chunk_size=chunk_size
        )
    return VerifyReport(
        variant_drift=tuple(VariantDrift.of(found) for found in variant_drift),
        job_drift=tuple(job_drift),
        stuck_jobs=tuple(s for s in stuck if s.job_id not in not_compared),
        flagged=tuple(flagged),
        held=tuple(holds.values()),
        jobs_in_flight=len(set(in_flight.job_ids)),
    )


def _job_drift(
    conn: Connection,
    partition: int | None,
    config: FoldConfig,
    *,
    skipped: Collection[uuid.UUID],
    limit: int,
    chunk_size: int,
) -> list[JobDrift]:
    """Jobs whose row is not the fold of their variants' stored states, chunk by chunk in job id order."""
    drift: list[JobDrift] = []
    after = uuid.UUID(int=0)
    while len(drift) < limit:
        job_ids = store.job_ids_with_state_after(conn, partition, after, chunk_size)
        if not job_ids:
            break
        after = job_ids[-1]
        checked = [job_id for job_id in job_ids if job_id not in skipped]
        folded = fold_jobs(checked, store.variant_states_to_fold(conn, checked), config)
        actual = store.jobs_get(conn, checked)
        for job_id, state in folded.states.items():
            expected = JobSide(state.status.value, state.current_step)
            stored = actual.get(job_id)
            if stored is not None and JobSide(stored.status, stored.current_step) != expected:
                drift.append(JobDrift(job_id, JobSide(stored.status, stored.current_step), expected))
    return drift


@dataclass(frozen=True, slots=True)
class RepairReport:
    resync_events: int
    jobs_rebuilt: int
    # What repair cannot decide, each with what to run.
    cannot_repair: tuple[str, ...]
    # Resync events the workers had not applied when repair stopped waiting.
    not_applied: int


def repair(conn: Connection, report: VerifyReport, *, wait: float = 30.0) -> RepairReport:
    """Fix what ``report`` found; then wait (up to ``wait`` s) for the workers to apply the resync events."""
    resynced = [_resync(conn, drift) for drift in report.variant_drift]
    jobs = sorted({d.job_id for d in report.job_drift} | {s.job_id for s in report.stuck_jobs})
    for start in range(0, len(jobs), 500):
        rebuild_jobs(conn, jobs[start : start + 500], dry_run=False)
    not_applied = _wait_until_applied(conn, resynced, wait) if resynced else 0
    return RepairReport(
        resync_events=len(resynced),
        jobs_rebuilt=len(jobs),
        cannot_repair=tuple(_advice(flag) for flag in report.flagged),
        not_applied=not_applied,
    )


def _resync(conn: Connection, drift: VariantDrift) -> uuid.UUID:
    """Append the event that brings the variant's stored state to its row; the variant."""
    state_job = drift.events.job_id if drift.events else None
    with conn.transaction():
        # The row's state as a new event, under the row's lock (its version orders after every
        # change already made to the variant).
        store.variant_resync(conn, drift.variant_id, state_job)
    if state_job is not None:
        # A stored state whose version capture never issued is rebuilt from the events too: no
        # new event could ever be newer. Its own transaction: appending the event above took the
        # outbox's lock, which must not be held while waiting for the checkpoints (the order of
        # `outbox repartition`).
        rebuild_jobs(conn, [state_job], variant_ids=[drift.variant_id], dry_run=False)
    return drift.variant_id


def _wait_until_applied(conn: Connection, variant_ids: list[uuid.UUID], wait: float) -> int:
    """Wait up to ``wait`` s for the workers to apply these variants' events; how many are still pending."""
    deadline = time.monotonic() + wait
    while (left := _pending_variants(conn, variant_ids)) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling the workers' progress, not synchronisation
    return left


def _pending_variants(conn: Connection, variant_ids: list[uuid.UUID]) -> int:
    return len(set(variant_ids) & set(store.in_flight_get(conn).variant_ids))


def _advice(flag: JobFlag) -> str:
    """What to do about a flagged job, in one line."""
    job, reason, letters = flag.job_id, flag.reason, flag.dead_letters
    if letters:
        ids = " ".join(str(e) for e in letters)
        return (
            f"job {job} is flagged ({reason}): fix the event and run `outbox dead-letters retry {ids}`, "
            f"or drop it with `outbox dead-letters discard {ids}`"
        )
    if "is not in the pipeline" in reason:
        return f"job {job} is flagged ({reason}): add the step with `outbox pipeline set ...`, or fix the variant"
    return f"job {job} is flagged ({reason}): see `outbox dead-letters list`"
