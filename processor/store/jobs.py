"""Job state: its one writer (jobs_write), its transitions, holds and row locks, and the jobs awaiting fold.

A job awaits its fold in outbox_dirty_jobs (the table keeps its name for running workers): after a
catch-up, until it closes; when its row was locked, until it is due again; at start-up when flagged.
To fold a job is to compute its state from its variants' (processor.fold) and write it here.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from psycopg.rows import class_row, scalar_row

from outbox.sqlfile import load_queries
from processor.fold import JobState
from processor.snapshot import Cursor, Snapshot
from processor.store._connection import Connection
from processor.store.checkpoint import checkpoint_lock

QUERIES = load_queries("processor.store", "jobs.sql")


@dataclass(frozen=True, slots=True)
class JobsWritten:
    """What jobs_write did; each job written with its state before and after (its transition)."""

    jobs_changed: int
    jobs_awaiting_fold: int  # of a partition catching up: folded when its catch-up closes
    jobs_blocked: list[uuid.UUID]  # rows another transaction held locked: folded again later
    # The transitions transitions_append writes, one per job changed, in job order.
    job_ids: Sequence[uuid.UUID] = ()
    from_statuses: Sequence[str | None] = ()
    from_steps: Sequence[str | None] = ()
    to_statuses: Sequence[str] = ()  # also the metric by ``to_status``
    to_steps: Sequence[str | None] = ()

    @classmethod
    def nothing(cls) -> JobsWritten:
        return cls(0, 0, [])


def jobs_write(
    conn: Connection,
    *,
    jobs: dict[uuid.UUID, JobState],
    flags: dict[uuid.UUID, str],
    folded: Sequence[uuid.UUID],
    catching_up_partitions: Iterable[int] = (),
) -> JobsWritten:
    """Write job states and flags (see the query: jobs of ``catching_up_partitions`` and locked rows await fold)."""
    with conn.cursor(row_factory=class_row(JobsWritten)) as cur:
        row = cur.execute(
            QUERIES["jobs_write"],
            {
                "job_ids": list(jobs),
                "job_statuses": [state.status.value for state in jobs.values()],
                "job_steps": [state.current_step for state in jobs.values()],
                "folded_job_ids": list(folded),
                "flag_job_ids": list(flags),
                "flag_reasons": list(flags.values()),
                "catching_up_partitions": sorted(catching_up_partitions),
            },
        ).fetchone()
    assert row is not None
    return row


@dataclass(frozen=True, slots=True)
class _TransitionsAppended:
    appended: int
    published: int | None  # NULL: nothing staged was published
    notified: bool | None


def transitions_append(
    conn: Connection, *written: JobsWritten, trace_parents: Mapping[uuid.UUID, str] | None = None
) -> int:
    """The transitions of the job states written in this transaction, and those holds staged; how many.

    The last statement before the commit (the query says why); with nothing written, it publishes
    what holds staged (an idle worker's call). ``trace_parents``: the trace context each job's
    transition carries (AppliedEvents.trace_parents).
    """
    job_ids: list[uuid.UUID] = []
    from_statuses: list[str | None] = []
    from_steps: list[str | None] = []
    to_statuses: list[str] = []
    to_steps: list[str | None] = []
    for each in written:
        job_ids.extend(each.job_ids)
        from_statuses.extend(each.from_statuses)
        from_steps.extend(each.from_steps)
        to_statuses.extend(each.to_statuses)
        to_steps.extend(each.to_steps)
    parents = [trace_parents.get(job_id) for job_id in job_ids] if trace_parents else []
    with conn.cursor(row_factory=class_row(_TransitionsAppended)) as cur:
        row = cur.execute(
            QUERIES["transitions_append"],
            {"job_ids": job_ids, "from_statuses": from_statuses, "from_steps": from_steps,
             "to_statuses": to_statuses, "to_steps": to_steps, "trace_parents": parents if any(parents) else None},
        ).fetchone()  # fmt: skip
    assert row is not None
    return row.appended + (row.published or 0)


@dataclass(frozen=True, slots=True)
class JobHold:
    """A held job (outbox.hold_job): its state is the application's until the hold is released."""

    job_id: uuid.UUID
    status: str
    current_step: str | None
    reason: str
    held_at: dt.datetime


def job_holds(conn: Connection, job_ids: Sequence[uuid.UUID] | None = None) -> dict[uuid.UUID, JobHold]:
    """Held jobs: all of them, or those among ``job_ids``."""
    with conn.cursor(row_factory=class_row(JobHold)) as cur:
        rows = cur.execute(QUERIES["job_holds_list"], {"job_ids": None if job_ids is None else list(job_ids)})
        return {hold.job_id: hold for hold in rows}


@dataclass(frozen=True, slots=True)
class RowLockHolder:
    """Who holds a job row locked (None where it cannot be told: a lock shared by several)."""

    job_id: uuid.UUID
    pid: int | None
    application_name: str | None
    state: str | None
    since: dt.datetime | None

    def describe(self) -> str:
        if self.pid is None:
            return "another transaction"
        return f"backend pid {self.pid} ({self.application_name or 'no application_name'}, {self.state}, " + (
            f"transaction open since {self.since.isoformat(timespec='seconds')})" if self.since else "transaction)"
        )


def jobs_lock_holders(conn: Connection, job_ids: Sequence[uuid.UUID]) -> list[RowLockHolder]:
    with conn.cursor(row_factory=class_row(RowLockHolder)) as cur:
        return cur.execute(QUERIES["jobs_lock_holders"], {"job_ids": list(job_ids)}).fetchall()


# The jobs awaiting fold (outbox_dirty_jobs).


def jobs_awaiting_fold_add(conn: Connection, partition: int, job_ids: Iterable[uuid.UUID]) -> None:
    conn.execute(QUERIES["jobs_awaiting_fold_add"], {"partition": partition, "job_ids": list(job_ids)})


def jobs_awaiting_fold_add_applied(conn: Connection, partition: int, old_done: Snapshot, new_done: Snapshot) -> None:
    """Queue the jobs of every event applied between two done snapshots (a catch-up that completes) for their fold."""
    conn.execute(
        QUERIES["jobs_awaiting_fold_add_applied"],
        {"partition": partition, **Cursor(old_done).closing(new_done).params()},
    )


def jobs_awaiting_fold_exist(conn: Connection, partition: int) -> bool:
    with conn.cursor(row_factory=scalar_row) as cur:
        return bool(cur.execute(QUERIES["jobs_awaiting_fold_exist"], {"partition": partition}).fetchone())


def jobs_awaiting_fold_add_flagged(conn: Connection, partition: int) -> None:
    """Queue the partition's flagged jobs to be folded again, under its checkpoint's lock.

    Raises PartitionMissingError when a repartition removed the partition meanwhile: nothing is
    queued for a partition no worker will take.
    """
    with conn.transaction():
        checkpoint_lock(conn, partition)
        conn.execute(QUERIES["jobs_awaiting_fold_add_flagged"], {"partition": partition})


@dataclass(frozen=True, slots=True)
class JobsTaken:
    """Jobs taken from the queue to be folded now, and in how many seconds the next waiting one is due."""

    job_ids: list[uuid.UUID]
    next_retry_in: float | None


def jobs_awaiting_fold_take(conn: Connection, partition: int, limit: int) -> JobsTaken:
    """Up to ``limit`` jobs ready to be folded (taken off the queue)."""
    with conn.cursor(row_factory=class_row(JobsTaken)) as cur:
        row = cur.execute(QUERIES["jobs_awaiting_fold_take"], {"partition": partition, "limit": limit}).fetchone()
    assert row is not None
    return row


@dataclass(frozen=True, slots=True)
class StoredJob:
    """A job's state as its row holds it now."""

    job_id: uuid.UUID
    status: str | None
    current_step: str | None


def job_ids_all(conn: Connection, partition: int | None) -> list[uuid.UUID]:
    """Every job (of ``partition``, or of all)."""
    return conn.cursor(row_factory=scalar_row).execute(QUERIES["jobs_all"], {"partition": partition}).fetchall()


def job_ids_with_events_since(conn: Connection, partition: int | None, since: dt.datetime) -> list[uuid.UUID]:
    params = {"partition": partition, "since": since}
    return conn.cursor(row_factory=scalar_row).execute(QUERIES["jobs_with_events_since"], params).fetchall()


def job_ids_existing(conn: Connection, job_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    params = {"job_ids": list(job_ids)}
    return conn.cursor(row_factory=scalar_row).execute(QUERIES["jobs_existing"], params).fetchall()


def job_ids_in_partition(conn: Connection, job_ids: Sequence[uuid.UUID], partition: int) -> list[uuid.UUID]:
    params = {"job_ids": list(job_ids), "partition": partition}
    return conn.cursor(row_factory=scalar_row).execute(QUERIES["jobs_in_partition"], params).fetchall()


def jobs_get(conn: Connection, job_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, StoredJob]:
    """The stored state of each of ``job_ids`` that exists."""
    rows = conn.cursor(row_factory=class_row(StoredJob)).execute(QUERIES["jobs_get"], {"job_ids": list(job_ids)})
    return {row.job_id: row for row in rows}
