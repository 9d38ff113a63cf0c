"""What the inspection commands read: `outbox backlog`, `outbox check`, `outbox verify` (and its repair's
one write) and `outbox explain`, each query in inspection.sql beside this module."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from psycopg.rows import class_row

from outbox.sqlfile import load_queries
from processor.store._connection import Connection

QUERIES = load_queries("processor.store", "inspection.sql")


# `outbox backlog`.


@dataclass(frozen=True, slots=True)
class PartitionCounts:
    """One partition's counts beside its pending work (dead letters and flags are every partition's)."""

    dead_letters: int
    flagged_jobs: int
    jobs_awaiting_fold: int
    outbox_bytes: int
    outbox_rows_estimate: int
    events_per_second: Decimal  # over the last minute
    last_event_id: int | None
    applied_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class WorkerSession:
    """A connected worker's session (its application_name is ``outbox-worker:host:pid``)."""

    pid: int
    application_name: str
    backend_start: dt.datetime
    state: str | None
    in_state_for: dt.timedelta | None

    @property
    def idle_for(self) -> dt.timedelta | None:
        return self.in_state_for if self.state == "idle" else None


def backlog_counts_get(conn: Connection, partition: int) -> PartitionCounts:
    with conn.cursor(row_factory=class_row(PartitionCounts)) as cur:
        counts = cur.execute(QUERIES["backlog_counts_get"], {"partition": partition}).fetchone()
    assert counts is not None
    return counts


def worker_sessions_list(conn: Connection) -> list[WorkerSession]:
    with conn.cursor(row_factory=class_row(WorkerSession)) as cur:
        return cur.execute(QUERIES["worker_sessions_list"]).fetchall()


# `outbox check`.


@dataclass(frozen=True, slots=True)
class HealthCounts:
    flagged_jobs: int
    dead_letters: int
    now: dt.datetime  # the database's clock, for the age of what subscriptions have not acknowledged


def health_counts_get(conn: Connection) -> HealthCounts:
    with conn.cursor(row_factory=class_row(HealthCounts)) as cur:
        counts = cur.execute(QUERIES["health_counts_get"]).fetchone()
    assert counts is not None
    return counts


# `outbox verify`.


@dataclass(frozen=True, slots=True)
class InFlight:
    """Pending work: its jobs and variants are not in job state yet, by design (not drift)."""

    job_ids: list[uuid.UUID]
    variant_ids: list[uuid.UUID]


@dataclass(frozen=True, slots=True)
class VariantDriftRow:
    """A variant whose row and stored state disagree (either side may be missing)."""

    variant_id: uuid.UUID
    row_job_id: uuid.UUID | None
    row_status: str | None
    row_step: str | None
    state_job_id: uuid.UUID | None
    state_status: str | None
    state_step: str | None


@dataclass(frozen=True, slots=True)
class StuckJob:
    """A job not done although every variant is done at the final step."""

    job_id: uuid.UUID
    status: str | None
    current_step: str | None


@dataclass(frozen=True, slots=True)
class JobFlag:
    """A flagged job: its state is knowingly not computed (and the dead letters that hold it)."""

    job_id: uuid.UUID
    reason: str
    flagged_at: dt.datetime
    dead_letters: list[int]


def in_flight_get(conn: Connection) -> InFlight:
    with conn.cursor(row_factory=class_row(InFlight)) as cur:
        found = cur.execute(QUERIES["in_flight_get"]).fetchone()
    assert found is not None
    return found


def variant_drift_list(
    conn: Connection, partition: int | None, *, limit: int, in_flight_variants: Sequence[uuid.UUID]
) -> list[VariantDriftRow]:
    params = {"partition": partition, "limit": limit, "in_flight_variants": list(in_flight_variants)}
    with conn.cursor(row_factory=class_row(VariantDriftRow)) as cur:
        return cur.execute(QUERIES["variant_drift_list"], params).fetchall()


def stuck_jobs_list(
    conn: Connection, partition: int | None, *, limit: int, in_flight_jobs: Sequence[uuid.UUID], final_step: str
) -> list[StuckJob]:
    params = {"partition": partition, "limit": limit, "in_flight_jobs": list(in_flight_jobs), "final_step": final_step}
    with conn.cursor(row_factory=class_row(StuckJob)) as cur:
        return cur.execute(QUERIES["stuck_jobs_list"], params).fetchall()


def job_ids_with_state_after(conn: Connection, partition: int | None, after: uuid.UUID, limit: int) -> list[uuid.UUID]:
    """The next ``limit`` jobs (in id order after ``after``) that have a stored variant state."""
    rows = conn.execute(QUERIES["job_ids_with_state_after"], {"partition": partition, "after": after, "limit": limit})
    return [job_id for (job_id,) in rows]


def job_flags_list(conn: Connection, partition: int | None, *, limit: int) -> list[JobFlag]:
    with conn.cursor(row_factory=class_row(JobFlag)) as cur:
        return cur.execute(QUERIES["job_flags_list"], {"partition": partition, "limit": limit}).fetchall()


def variant_resync(conn: Connection, variant_id: uuid.UUID, state_job_id: uuid.UUID | None) -> None:
    """Append an event carrying the variant row's state (or its removal from ``state_job_id``), under the row's lock."""
    conn.execute(QUERIES["variant_resync"], {"variant_id": variant_id, "state_job_id": state_job_id})


# `outbox explain` (processor/explain.py): one job, every read by a key or an index.


@dataclass(frozen=True, slots=True)
class JobOverview:
    """A job's row, its partition's checkpoint, its flag and its place in outbox_dirty_jobs."""

    status: str | None
    current_step: str | None
    updated_at: dt.datetime | None
    partition: int
    done_snapshot: str | None
    target_snapshot: str | None
    checkpoint_updated_at: dt.datetime | None
    flag_reason: str | None
    flagged_at: dt.datetime | None
    awaiting_fold_since: dt.datetime | None
    awaiting_fold_retry_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class VariantInspection:
    """One variant of a job: its row, stored state, baseline, event counts and the open transaction on its row."""

    variant_id: uuid.UUID
    partition: int | None  # of the job its stored state (else its row) is in
    row_job_id: uuid.UUID | None
    row_status: str | None
    row_step: str | None
    state_job_id: uuid.UUID | None
    state_version: int | None
    state_status: str | None
    state_step: str | None
    state_removed: bool | None
    state_problem: str | None
    state_event_id: int | None
    baseline_job_id: uuid.UUID | None
    baseline_version: int | None
    baseline_status: str | None
    baseline_step: str | None
    baseline_removed: bool | None
    baseline_event_id: int | None
    events_total: int
    events_pending: int
    writer_pid: int | None
    writer_application_name: str | None
    writer_state: str | None
    writer_since: dt.datetime | None
    writer_xid: str | None
    writer_prepared_gid: str | None
    writer_wrote_outbox: bool | None


@dataclass(frozen=True, slots=True)
class RecentEvent:
    """One of a variant's newest events, as the drain reads it, with what its checkpoint says of it."""

    variant_id: uuid.UUID
    event_id: int
    txid: str
    partition: int
    job_id: uuid.UUID | None
    event_type: str
    version: int | None
    created_at: dt.datetime
    status: str | None
    step: str | None
    readable: bool
    applied: bool | None  # None: no checkpoint for its partition
    pending: bool
    dead_letter_reason: str | None
    dead_letter_holds_job: bool | None
    dead_letter_discarded_at: dt.datetime | None


def job_overview_get(conn: Connection, job_id: uuid.UUID) -> JobOverview | None:
    with conn.cursor(row_factory=class_row(JobOverview)) as cur:
        return cur.execute(QUERIES["job_overview_get"], {"job_id": job_id}).fetchone()


def job_variants_inspect(conn: Connection, job_id: uuid.UUID) -> list[VariantInspection]:
    with conn.cursor(row_factory=class_row(VariantInspection)) as cur:
        return cur.execute(QUERIES["job_variants_inspect"], {"job_id": job_id}).fetchall()


def variant_events_recent(conn: Connection, variant_ids: Sequence[uuid.UUID], limit: int) -> list[RecentEvent]:
    """The ``limit`` newest events of each variant, newest first."""
    with conn.cursor(row_factory=class_row(RecentEvent)) as cur:
        return cur.execute(
            QUERIES["variant_events_recent"], {"variant_ids": list(variant_ids), "limit": limit}
        ).fetchall()
