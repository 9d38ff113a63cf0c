"""The outbox's events as the drain reads them: after a cursor, applied in one statement per batch."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import class_row, dict_row, scalar_row

from outbox.sqlfile import load_queries
from processor.decode import EventRow
from processor.snapshot import Cursor, Position, Snapshot
from processor.store._connection import Connection

QUERIES = load_queries("processor.store", "events.sql")


@dataclass(frozen=True, slots=True)
class AppliedEvents:
    """What events_apply read and applied (see its comment in events.sql)."""

    target: Snapshot
    count: int
    event_ids: list[int]
    created_at: list[float]  # epoch seconds, database clock
    last: Position | None
    unreadable: list[int]  # event ids left to processor.decode
    jobs: list[uuid.UUID]  # to fold again
    moved_from: list[uuid.UUID]  # jobs that variants left (to fold again too)
    # The W3C traceparent of each job's last event that carries one (the writer's trace context).
    trace_parents: dict[uuid.UUID, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _AppliedRow:
    """events_apply's one row, as the statement returns it (NULL arrays for an empty batch)."""

    target: str
    count: int
    event_ids: list[int] | None
    created_at: list[float] | None
    last_txid: str | None
    readable: int
    unreadable: list[int] | None
    jobs: list[uuid.UUID] | None
    moved_from: list[uuid.UUID] | None
    traced_job_ids: list[uuid.UUID] | None
    trace_parents: list[str] | None

    def applied(self) -> AppliedEvents:
        event_ids = self.event_ids or []
        unreadable = self.unreadable or []
        if self.readable + len(unreadable) != self.count:  # every event is applied here or decoded in Python
            raise RuntimeError(f"events_apply accounted for {self.readable} + {len(unreadable)} of {self.count} events")
        traced = self.traced_job_ids
        return AppliedEvents(
            target=Snapshot.parse(self.target),
            count=self.count,
            event_ids=event_ids,
            created_at=self.created_at or [],
            last=Position(int(self.last_txid), event_ids[-1]) if self.count and self.last_txid else None,
            unreadable=unreadable,
            jobs=self.jobs or [],
            moved_from=self.moved_from or [],
            trace_parents=dict(zip(traced, self.trace_parents or [], strict=True)) if traced else {},
        )


def events_probe(conn: Connection, partition: int, cursor: Cursor) -> bool:
    """Whether events are ready after ``cursor`` (outside any transaction: it reads only)."""
    with conn.cursor(row_factory=scalar_row) as cur:
        return bool(cur.execute(QUERIES["events_probe"], {"partition": partition, **cursor.params()}).fetchone())


def events_apply(conn: Connection, partition: int, cursor: Cursor, limit: int) -> AppliedEvents:
    """Read up to ``limit`` events after ``cursor`` and apply the readable ones to variant states.

    Only inside the batch's transaction: the planner settings it needs (events_apply_in_order) are
    transaction-local, and outside a transaction block they would silently not apply.
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
        raise RuntimeError("events_apply runs inside the batch's transaction (its planner settings are SET LOCAL)")
    with conn.cursor(row_factory=dict_row) as cur:
        settings_before = cur.execute(QUERIES["events_apply_in_order"]).fetchone()
    assert settings_before is not None
    with conn.cursor(row_factory=class_row(_AppliedRow), binary=True) as cur:
        row = cur.execute(
            QUERIES["events_apply"], {"partition": partition, "limit": limit, **cursor.params()}
        ).fetchone()
    conn.execute(QUERIES["events_apply_done"], settings_before)  # by name: the columns are its parameters
    assert row is not None
    return row.applied()


def events_get(conn: Connection, event_ids: Sequence[int]) -> list[EventRow]:
    """Events by id, in order, as processor.decode reads them."""
    with conn.cursor(row_factory=class_row(EventRow)) as cur:
        return cur.execute(QUERIES["events_get"], {"event_ids": list(event_ids)}).fetchall()


@dataclass(frozen=True, slots=True)
class PendingSummary:
    """Pending work (the query events_pending_summary says what pending means)."""

    count: int  # events whose effect is not in job state yet
    oldest_age_seconds: float | None  # of the oldest such event or job awaiting fold
    by_event_type: dict[str, int]
    top_jobs: list[dict[str, Any]]
    jobs_awaiting_fold: int  # in outbox_dirty_jobs

    @property
    def total(self) -> int:
        return self.count + self.jobs_awaiting_fold


def events_pending_summary(conn: Connection, partition: int | None, *, top: int = 10) -> PendingSummary:
    """Pending work of ``partition`` (None: of every partition)."""
    with conn.cursor(row_factory=class_row(PendingSummary)) as cur:
        row = cur.execute(QUERIES["events_pending_summary"], {"partition": partition, "top": top}).fetchone()
    assert row is not None
    return row


def work_pending(conn: Connection, partition: int | None = None) -> int:
    """Pending events plus jobs awaiting fold (of every partition by default): 0 when caught up."""
    return events_pending_summary(conn, partition, top=0).total
