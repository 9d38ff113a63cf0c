"""What is left of the store before its split by concern (processor/store/__init__.py)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import class_row

from outbox.events import VariantStatus
from outbox.sqlfile import load_queries
from outbox.subscription import Transition
from processor.decode import DeadLetter, DeadLetterClass, EventRow
from processor.errors import PartitionMissingError
from processor.fold import JobState, VariantState
from processor.snapshot import Cursor, Position, Snapshot

QUERIES = load_queries("processor", "queries.sql")

# First key of the consumer's advisory lock (the second is the partition). A fixed constant, so
# that every worker of every version agrees on it; chosen to be unlikely to collide with the
# application's own advisory locks.
CONSUMER_LOCK_CLASS = 0x0B0C_5E11

Connection = psycopg.Connection[Any]

_STATUSES = {status.value: status for status in VariantStatus}  # a dict lookup: cheaper than VariantStatus(x)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    cursor: Cursor
    events_applied: int
    updated_at: dt.datetime | None
    fold_config_version: int = 0


@dataclass(frozen=True, slots=True)
class LockedCheckpoint:
    """A checkpoint row as locked: where the partition is, and the fold configuration it folds with."""

    partition: int
    cursor: Cursor
    fold_config_version: int


@dataclass(frozen=True, slots=True)
class CommitResult:
    committed_at: dt.datetime


@dataclass(frozen=True, slots=True)
class JobsWritten:
    jobs_changed: int
    jobs_deferred: int  # of a partition catching up: folded when its catch-up closes
    jobs_blocked: list[uuid.UUID]  # rows another transaction held locked: tried again later
    # Each job written, its state before and after: the transitions transitions_append writes.
    transitions: tuple[list[Any], ...] = ((), (), (), (), ())  # type: ignore[assignment]

    @property
    def to_statuses(self) -> Sequence[str]:
        """The status each job written was given, one per job changed (the metric by ``to_status``)."""
        return self.transitions[3]


@dataclass(frozen=True, slots=True)
class LockHolder:
    pid: int
    application_name: str
    since: dt.datetime


def _cursor(done: str, target: str | None, after_txid: str, after_event_id: int) -> Cursor:
    return Cursor(
        Snapshot.parse(done), Snapshot.parse(target) if target else None, Position(int(after_txid), after_event_id)
    )


def _cursor_params(cursor: Cursor) -> dict[str, Any]:
    # Events not visible in the done snapshot start at its xmax (event ids start at 1); within a
    # catch-up, after the last event applied.
    range_start = max(cursor.after, Position(cursor.done.xmax, 0))
    return {
        "range_txid": str(range_start.txid),
        "range_event_id": range_start.event_id,
        "done": str(cursor.done),
        "done_xmax": str(cursor.done.xmax),
        "done_xip": [str(x) for x in sorted(cursor.done.xip)],
        "target": str(cursor.target) if cursor.target else None,
        "after_txid": str(cursor.after.txid),
        "after_event_id": cursor.after.event_id,
    }


def checkpoint_get(conn: Connection, partition: int) -> Checkpoint:
    row = conn.execute(QUERIES["checkpoint_get"], {"partition": partition}).fetchone()
    if row is None:
        raise PartitionMissingError(partition)
    return Checkpoint(_cursor(*row[:4]), row[4], row[5], row[6])


def checkpoint_lock(conn: Connection, partition: int) -> LockedCheckpoint:
    row = conn.execute(QUERIES["checkpoint_lock"], {"partition": partition}).fetchone()
    if row is None:
        raise PartitionMissingError(partition)
    return LockedCheckpoint(partition, _cursor(*row[:4]), row[4])


def checkpoints_lock_all(conn: Connection) -> dict[int, LockedCheckpoint]:
    """Lock every partition's checkpoint, in partition order (see the query), inside a transaction.

    A statement that waited for a lock sees the rows of its own snapshot, taken before the wait: if
    it waited for `outbox repartition`, the checkpoints that one created are not among them. So the
    lock is taken again, by a new statement, until two in a row find the same partitions.
    """
    locked: dict[int, LockedCheckpoint] = {}
    while True:
        rows = conn.execute(QUERIES["checkpoints_lock_all"]).fetchall()
        again = {row[0]: LockedCheckpoint(row[0], _cursor(*row[1:5]), row[5]) for row in rows}
        if again.keys() == locked.keys():
            return again
        locked = again


def events_probe(conn: Connection, partition: int, cursor: Cursor) -> bool:
    """Whether events are ready after ``cursor`` (outside any transaction: it reads only)."""
    row = conn.execute(QUERIES["events_probe"], {"partition": partition, **_cursor_params(cursor)}).fetchone()
    return bool(row and row[0])


@dataclass(frozen=True, slots=True)
class AppliedEvents:
    """What events_apply read and applied (see its comment in queries.sql)."""

    target: Snapshot
    count: int
    event_ids: list[int]
    created_at: list[float]  # epoch seconds, database clock
    last: Position | None
    unreadable: list[int]  # event ids left to processor.decode
    jobs: list[uuid.UUID]  # to refold
    moved_from: list[uuid.UUID]  # jobs that variants left (to refold too)
    # The W3C traceparent of each job's last event that carries one (the writer's trace context).
    trace_parents: dict[uuid.UUID, str] = field(default_factory=dict)


def events_apply(conn: Connection, partition: int, cursor: Cursor, limit: int) -> AppliedEvents:
    """Read up to ``limit`` events after ``cursor`` and apply the readable ones to variant states."""
    row = conn.execute(
        QUERIES["events_apply"], {"partition": partition, "limit": limit, **_cursor_params(cursor)}, binary=True
    ).fetchone()
    assert row is not None
    target, count, event_ids, created_at, last_txid, readable, unreadable, jobs, moved_from, traced, parents = row
    event_ids = event_ids or []
    unreadable = unreadable or []
    if readable + len(unreadable) != count:  # every event is applied here or decoded in Python: never neither
        raise RuntimeError(f"events_apply accounted for {readable} + {len(unreadable)} of {count} events")
    return AppliedEvents(
        target=Snapshot.parse(target),
        count=count,
        event_ids=event_ids,
        created_at=created_at or [],
        last=Position(int(last_txid), event_ids[-1]) if count else None,
        unreadable=unreadable,
        jobs=jobs or [],
        moved_from=moved_from or [],
        trace_parents=dict(zip(traced, parents, strict=True)) if traced else {},
    )


def events_get(conn: Connection, event_ids: Sequence[int]) -> list[EventRow]:
    return event_rows(conn.execute(QUERIES["events_get"], {"event_ids": list(event_ids)}).fetchall())


def dirty_jobs_add_applied(conn: Connection, partition: int, old_done: Snapshot, new_done: Snapshot) -> None:
    """Queue the jobs of every event applied between two done snapshots, to be folded."""
    conn.execute(
        QUERIES["dirty_jobs_add_applied"],
        {
            "partition": partition,
            "done_xmax": str(old_done.xmax),
            "done_xip": [str(x) for x in sorted(old_done.xip)],
            "new_done": str(new_done),
        },
    )


@dataclass(frozen=True, slots=True)
class PendingSummary:
    """Pending work (the query events_pending_summary says what pending means)."""

    count: int  # events whose effect is not in job state yet
    oldest_age_seconds: float | None  # of the oldest such event or waiting job
    by_event_type: dict[str, int]
    top_jobs: list[dict[str, Any]]
    jobs_waiting: int  # in outbox_dirty_jobs

    @property
    def total(self) -> int:
        return self.count + self.jobs_waiting


def events_pending_summary(conn: Connection, partition: int | None, *, top: int = 10) -> PendingSummary:
    """Pending work of ``partition`` (None: of every partition)."""
    row = conn.execute(QUERIES["events_pending_summary"], {"partition": partition, "top": top}).fetchone()
    assert row is not None
    return PendingSummary(int(row[0]), row[1], dict(row[2]), list(row[3]), int(row[4]))


def variant_states_upsert(
    conn: Connection, partition: int, changes: Sequence[tuple[VariantState, int]], *, defer: bool
) -> set[uuid.UUID]:
    """Store each (state, event id) unless a newer version is stored; return the jobs to refold.

    At most one change per variant (ON CONFLICT cannot touch a row twice in one statement). With
    ``defer``, the jobs go to outbox_dirty_jobs and nothing is returned.
    """
    if not changes:
        return set()
    rows = conn.execute(
        QUERIES["variant_states_upsert"],
        {
            "partition": partition,
            "defer": defer,
            **_state_params(changes),
        },
    ).fetchall()
    return {row[0] for row in rows}


def variant_states_to_fold(conn: Connection, job_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, list[VariantState]]:
    """Each job's distinct live variant states (see the query): all that processor.fold needs."""
    rows = conn.execute(QUERIES["variant_states_to_fold"], {"job_ids": list(job_ids)}, binary=True).fetchall()
    by_job: dict[uuid.UUID, list[VariantState]] = defaultdict(list)
    statuses = _STATUSES
    for job_id, variant_id, version, status, step, problem in rows:
        by_job[job_id].append(
            VariantState(variant_id, job_id, version, statuses[status] if status else None, step, False, problem)
        )
    return by_job


def dirty_jobs_exist(conn: Connection, partition: int) -> bool:
    row = conn.execute(QUERIES["dirty_jobs_exist"], {"partition": partition}).fetchone()
    return bool(row and row[0])


def work_pending(conn: Connection, partition: int | None = None) -> int:
    """Pending events plus jobs waiting to be folded (of every partition by default): 0 when caught up."""
    return events_pending_summary(conn, partition, top=0).total


@contextmanager
def one_snapshot(conn: Connection) -> Iterator[None]:
    """Run what is inside in one REPEATABLE READ, read-only transaction: one consistent view.

    Inside a transaction the caller opened, it adds nothing (the caller chose how to read).
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        yield
        return
    with conn.transaction():
        conn.execute(QUERIES["transaction_snapshot"])
        yield


def dirty_jobs_add_flagged(conn: Connection, partition: int) -> None:
    """Queue the partition's flagged jobs to be folded again, under its checkpoint's lock.

    Raises PartitionMissingError when a repartition removed the partition meanwhile: nothing is
    queued for a partition no worker will take.
    """
    with conn.transaction():
        checkpoint_lock(conn, partition)
        conn.execute(QUERIES["dirty_jobs_add_flagged"], {"partition": partition})


def dirty_jobs_take(conn: Connection, partition: int, limit: int) -> tuple[list[uuid.UUID], float | None]:
    """Up to ``limit`` jobs ready to be folded, and in how many seconds the next waiting one is due."""
    row = conn.execute(QUERIES["dirty_jobs_take"], {"partition": partition, "limit": limit}).fetchone()
    assert row is not None
    return list(row[0]), row[1]


def dead_letters_park(conn: Connection, partition: int, dead_letters: Sequence[DeadLetter]) -> int:
    """Park dead letters (before the batch folds its jobs: one that holds its job flags it); return how many."""
    row = conn.execute(
        QUERIES["dead_letters_park"],
        {
            "partition": partition,
            "dead_event_ids": [d.event_id for d in dead_letters],
            "dead_job_ids": [d.job_id for d in dead_letters],
            "dead_variant_ids": [d.variant_id for d in dead_letters],
            "dead_reasons": [d.reason for d in dead_letters],
            "dead_holds_job": [d.holds_job for d in dead_letters],
        },
    ).fetchone()
    assert row is not None
    return int(row[0])


def batch_commit(
    conn: Connection,
    partition: int,
    *,
    cursor: Cursor,
    event_count: int,
    last_event_id: int | None = None,
) -> CommitResult:
    """Move the checkpoint past the batch and count it (the batch's last statement)."""
    row = conn.execute(
        QUERIES["batch_commit"],
        {
            "partition": partition,
            "event_count": event_count,
            "last_applied_event_id": last_event_id,
            **_cursor_params(cursor),
        },
    ).fetchone()
    assert row is not None
    return CommitResult(committed_at=row[0])


def jobs_write(
    conn: Connection,
    *,
    jobs: dict[uuid.UUID, JobState],
    flags: dict[uuid.UUID, str],
    folded: Sequence[uuid.UUID],
    deferred_partitions: Iterable[int] = (),
) -> JobsWritten:
    """Write job states and flags (see the query: jobs of ``deferred_partitions`` and locked rows wait)."""
    row = conn.execute(
        QUERIES["jobs_write"],
        {
            "job_ids": list(jobs),
            "job_statuses": [state.status.value for state in jobs.values()],
            "job_steps": [state.current_step for state in jobs.values()],
            "folded_job_ids": list(folded),
            "flag_job_ids": list(flags),
            "flag_reasons": list(flags.values()),
            "deferred_partitions": sorted(deferred_partitions),
        },
    ).fetchone()
    assert row is not None
    return JobsWritten(row[0], row[1], list(row[2]), tuple(row[3:8]))


def transitions_append(
    conn: Connection, *written: JobsWritten, trace_parents: Mapping[uuid.UUID, str] | None = None
) -> int:
    """The transitions of the job states written in this transaction, and those holds staged; how many.

    The last statement before the commit (the query says why); with nothing written, it publishes
    what holds staged (an idle worker's call). ``trace_parents``: the trace context each job's
    transition carries (AppliedEvents.trace_parents).
    """
    columns: list[list[Any]] = [[], [], [], [], []]
    for each in written:
        for column, values in zip(columns, each.transitions, strict=True):
            column.extend(values)
    job_ids, from_statuses, from_steps, to_statuses, to_steps = columns
    parents = [trace_parents.get(job_id) for job_id in job_ids] if trace_parents else []
    row = conn.execute(
        QUERIES["transitions_append"],
        {"job_ids": job_ids, "from_statuses": from_statuses, "from_steps": from_steps,
         "to_statuses": to_statuses, "to_steps": to_steps, "trace_parents": parents if any(parents) else None},
    ).fetchone()  # fmt: skip
    assert row is not None
    return int(row[0]) + int(row[1] or 0)


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
    rows = conn.execute(QUERIES["job_holds_list"], {"job_ids": None if job_ids is None else list(job_ids)})
    return {row[0]: JobHold(*row) for row in rows}


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
    rows = conn.execute(QUERIES["jobs_lock_holders"], {"job_ids": list(job_ids)}).fetchall()
    return [RowLockHolder(*row) for row in rows]


def session_configure(conn: Connection, *, statement_timeout: float, session_timeout: float) -> None:
    conn.execute(
        QUERIES["session_configure"],
        {
            "statement_timeout": f"{int(statement_timeout * 1000)}ms",
            "session_timeout": f"{int(session_timeout * 1000)}ms",
        },
    )


def consumer_lock_try(conn: Connection, partition: int) -> bool:
    row = conn.execute(
        QUERIES["consumer_lock_try"], {"lock_class": CONSUMER_LOCK_CLASS, "partition": partition}
    ).fetchone()
    return bool(row and row[0])


def consumer_lock_release(conn: Connection, partition: int) -> None:
    conn.execute(QUERIES["consumer_lock_release"], {"lock_class": CONSUMER_LOCK_CLASS, "partition": partition})


def consumer_lock_holder(conn: Connection, partition: int) -> LockHolder | None:
    row = conn.execute(
        QUERIES["consumer_lock_holder"], {"lock_class": CONSUMER_LOCK_CLASS, "partition": partition}
    ).fetchone()
    return LockHolder(pid=row[0], application_name=row[1], since=row[2]) if row else None


# Operations (replay, verify, dead letters, prune). Callers lock the checkpoint row first.


def event_rows(rows: Sequence[Sequence[Any]]) -> list[EventRow]:
    """EventRow from the first ten columns of an outbox_events query (the tenth: version_issued)."""
    return [
        EventRow(
            event_id=r[0], txid=int(r[1]), event_type=r[2], schema_version=r[3], job_id=r[4],
            variant_id=r[5], variant_version=r[6], payload=r[7], created_at=r[8], version_issued=bool(r[9]),
        )
        for r in rows
    ]  # fmt: skip


def _state_params(states: Sequence[tuple[VariantState, int]]) -> dict[str, Any]:
    return {
        "variant_ids": [s.variant_id for s, _ in states],
        "job_ids": [s.job_id for s, _ in states],
        "versions": [s.version for s, _ in states],
        "statuses": [s.status.value if s.status else None for s, _ in states],
        "steps": [s.step for s, _ in states],
        "removed": [s.removed for s, _ in states],
        "problems": [s.problem for s, _ in states],
        "event_ids": [event_id for _, event_id in states],
    }


def job_ids_all(conn: Connection, partition: int | None) -> list[uuid.UUID]:
    """Every job (of ``partition``, or of all)."""
    return [row[0] for row in conn.execute(QUERIES["jobs_all"], {"partition": partition})]


def job_ids_with_events_since(conn: Connection, partition: int | None, since: dt.datetime) -> list[uuid.UUID]:
    rows = conn.execute(QUERIES["jobs_with_events_since"], {"partition": partition, "since": since})
    return [row[0] for row in rows]


def job_ids_existing(conn: Connection, job_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    return [row[0] for row in conn.execute(QUERIES["jobs_existing"], {"job_ids": list(job_ids)})]


def jobs_get(conn: Connection, job_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, tuple[str | None, str | None]]:
    rows = conn.execute(QUERIES["jobs_get"], {"job_ids": list(job_ids)}).fetchall()
    return {row[0]: (row[1], row[2]) for row in rows}


def replay_variants_of_jobs(conn: Connection, job_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    return [row[0] for row in conn.execute(QUERIES["replay_variants_of_jobs"], {"job_ids": list(job_ids)})]


def variant_states_rebuild(conn: Connection, variant_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Rebuild these variants' states from the baseline and applied events; return the jobs to fold again.

    The caller holds every checkpoint's lock (checkpoints_lock_all).
    """
    rows = conn.execute(QUERIES["variant_states_rebuild"], {"variant_ids": list(variant_ids)}).fetchall()
    return {row[0] for row in rows if row[0] is not None}


def prune_chunk(
    conn: Connection, partition: int, *, cutoff: dt.datetime, done: Snapshot, limit: int
) -> tuple[int, int]:
    """Fold up to ``limit`` prunable events into the baseline and delete them: (events deleted, baselines)."""
    row = conn.execute(
        QUERIES["prune_chunk"], {"partition": partition, "cutoff": cutoff, "done": str(done), "limit": limit}
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1] or 0)


def dirty_jobs_add(conn: Connection, partition: int, job_ids: Iterable[uuid.UUID]) -> None:
    conn.execute(QUERIES["dirty_jobs_add"], {"partition": partition, "job_ids": list(job_ids)})


# Wake-up by NOTIFY (OUTBOX_WAKEUP=notify; processor/wakeup.py, schema/migrations/0003_notify_wakeup.sql).


def wakeup_listen(conn: Connection) -> None:
    conn.execute(QUERIES["wakeup_listen"])


def wakeup_trigger_enabled(conn: Connection) -> bool:
    row = conn.execute(QUERIES["wakeup_trigger_enabled"]).fetchone()
    return bool(row and row[0])


def wakeup_trigger_set(conn: Connection, *, enabled: bool) -> None:
    """Create (or drop) the statement trigger by which writers of jobs_variants notify the worker."""
    conn.execute(QUERIES["wakeup_enable" if enabled else "wakeup_disable"])


# Partitions (processor/repartition.py, and the worker's share of them).

MEMBER_LOCK_CLASS = CONSUMER_LOCK_CLASS + 1  # held shared by every live worker session
# Held (key 0) by the one metrics refresh connection that computes the gauges that scan pending work
# (processor/metrics.py); 0x0B0C5E13 is outbox.subscription's.
METRICS_LOCK_CLASS = CONSUMER_LOCK_CLASS + 3


def partitions_get(conn: Connection) -> int:
    row = conn.execute(QUERIES["partitions_get"]).fetchone()
    assert row is not None
    return int(row[0])


def members_join(conn: Connection) -> None:
    conn.execute(QUERIES["members_join"], {"lock_class": MEMBER_LOCK_CLASS})


def members_count(conn: Connection) -> int:
    row = conn.execute(QUERIES["members_count"], {"lock_class": MEMBER_LOCK_CLASS}).fetchone()
    return int(row[0]) if row else 0


def consumer_lock_holders(conn: Connection) -> dict[int, LockHolder]:
    rows = conn.execute(QUERIES["consumer_locks_holders"], {"lock_class": CONSUMER_LOCK_CLASS}).fetchall()
    return {row[0]: LockHolder(pid=row[1], application_name=row[2], since=row[3]) for row in rows}


def job_ids_in_partition(conn: Connection, job_ids: Sequence[uuid.UUID], partition: int) -> list[uuid.UUID]:
    rows = conn.execute(QUERIES["jobs_in_partition"], {"job_ids": list(job_ids), "partition": partition})
    return [row[0] for row in rows]


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


@dataclass(frozen=True, slots=True)
class JobDeadLetter:
    event_id: int
    variant_id: uuid.UUID | None
    reason: str
    holds_job: bool
    parked_at: dt.datetime
    discarded_at: dt.datetime | None
    event_type: str | None  # None: its event was pruned
    created_at: dt.datetime | None


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


def job_dead_letters_list(conn: Connection, job_id: uuid.UUID, limit: int) -> list[JobDeadLetter]:
    with conn.cursor(row_factory=class_row(JobDeadLetter)) as cur:
        return cur.execute(QUERIES["job_dead_letters_list"], {"job_id": job_id, "limit": limit}).fetchall()


def job_transitions_recent(conn: Connection, job_id: uuid.UUID, limit: int) -> list[Transition]:
    """The job's ``limit`` newest transitions, newest first."""
    rows = conn.execute(QUERIES["job_transitions_recent"], {"job_id": job_id, "limit": limit}).fetchall()
    return [Transition(*row) for row in rows]


# Metrics (processor/metrics.py): what only the elected refresh connection reads.


def metrics_lock_try(conn: Connection) -> bool:
    """Take the metrics refresh's session lock (one holder among every worker); call once per session."""
    row = conn.execute(QUERIES["metrics_lock_try"], {"lock_class": METRICS_LOCK_CLASS}).fetchone()
    return bool(row and row[0])


def dead_letters_count_by_class(conn: Connection) -> dict[DeadLetterClass, int]:
    """Dead letters waiting for retry or discard, by the class of their reason (every class, 0 included)."""
    kinds = list(DeadLetterClass)
    rows = conn.execute(
        QUERIES["dead_letters_count_by_class"],
        {"classes": [str(k) for k in kinds], "prefixes": [k.prefix for k in kinds]},
    ).fetchall()
    counts = dict.fromkeys(kinds, 0)
    counts.update({DeadLetterClass(kind): int(n) for kind, n in rows})
    return counts


def job_flags_count(conn: Connection) -> int:
    row = conn.execute(QUERIES["job_flags_count"]).fetchone()
    return int(row[0]) if row else 0


def event_writers_list(conn: Connection) -> dict[str, float | None]:
    """The open transactions that wrote outbox events: {transaction id: seconds open, None if hidden}."""
    return {str(xid): (None if age is None else float(age)) for xid, age in conn.execute(QUERIES["event_writers_list"])}
