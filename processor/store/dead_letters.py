"""Dead letters as operators handle them (`outbox dead-letters`, `outbox explain`); SQL in dead_letters.sql."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.rows import class_row, scalar_row

from outbox.sqlfile import load_queries
from processor.decode import DeadLetter, EventRow
from processor.store._connection import Connection

QUERIES = load_queries("processor.store", "dead_letters.sql")


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """A parked event with the reason it could not be applied (its event's columns None once pruned)."""

    event_id: int
    partition: int
    job_id: uuid.UUID | None
    variant_id: uuid.UUID | None
    reason: str
    parked_at: dt.datetime
    discarded_at: dt.datetime | None
    event_type: str | None
    schema_version: int | None
    written_at: dt.datetime | None
    holds_job: bool


@dataclass(frozen=True, slots=True)
class DeadLetterEvent:
    """A dead letter's event, read as the drain reads events, for a retry."""

    event_id: int
    txid: str
    event_type: str
    schema_version: int
    job_id: uuid.UUID | None
    variant_id: uuid.UUID | None
    variant_version: int | None
    payload: Any
    created_at: dt.datetime
    version_issued: bool | None
    discarded_at: dt.datetime | None

    def event_row(self) -> EventRow:
        return EventRow(
            event_id=self.event_id, txid=int(self.txid), event_type=self.event_type,
            schema_version=self.schema_version, job_id=self.job_id, variant_id=self.variant_id,
            variant_version=self.variant_version, payload=self.payload, created_at=self.created_at,
            version_issued=bool(self.version_issued),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class DiscardedLetter:
    job_id: uuid.UUID | None
    variant_id: uuid.UUID | None


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


def dead_letters_list(conn: Connection, *, include_discarded: bool, limit: int) -> list[DeadLetterRecord]:
    with conn.cursor(row_factory=class_row(DeadLetterRecord)) as cur:
        return cur.execute(
            QUERIES["dead_letters_list"], {"include_discarded": include_discarded, "limit": limit}
        ).fetchall()


def dead_letter_event_get(conn: Connection, event_id: int) -> DeadLetterEvent | None:
    with conn.cursor(row_factory=class_row(DeadLetterEvent)) as cur:
        return cur.execute(QUERIES["dead_letter_event_get"], {"event_id": event_id}).fetchone()


def dead_letter_reason_update(conn: Connection, event_id: int, *, reason: str, holds_job: bool) -> None:
    conn.execute(QUERIES["dead_letter_reason_update"], {"event_id": event_id, "reason": reason, "holds_job": holds_job})


def dead_letter_delete(conn: Connection, event_id: int) -> None:
    conn.execute(QUERIES["dead_letter_delete"], {"event_id": event_id})


def dead_letter_discard(conn: Connection, event_id: int) -> DiscardedLetter | None:
    """Mark the letter discarded (idempotent); None if no dead letter has this id."""
    with conn.cursor(row_factory=class_row(DiscardedLetter)) as cur:
        return cur.execute(QUERIES["dead_letter_discard"], {"event_id": event_id}).fetchone()


def dead_letters_partitions(conn: Connection, event_ids: Sequence[int]) -> dict[int, int]:
    """The partition of each of these dead letters (ids that are none are left out)."""
    rows = conn.execute(QUERIES["dead_letters_partitions"], {"event_ids": list(event_ids)})
    return {event_id: partition for event_id, partition in rows}


def job_dead_letters_list(conn: Connection, job_id: uuid.UUID, limit: int) -> list[JobDeadLetter]:
    with conn.cursor(row_factory=class_row(JobDeadLetter)) as cur:
        return cur.execute(QUERIES["job_dead_letters_list"], {"job_id": job_id, "limit": limit}).fetchall()


def dead_letters_park(conn: Connection, partition: int, dead_letters: Sequence[DeadLetter]) -> int:
    """Park dead letters (before the batch folds its jobs: one that holds its job flags it); return how many."""
    params = {
        "partition": partition,
        "dead_event_ids": [d.event_id for d in dead_letters],
        "dead_job_ids": [d.job_id for d in dead_letters],
        "dead_variant_ids": [d.variant_id for d in dead_letters],
        "dead_reasons": [d.reason for d in dead_letters],
        "dead_holds_job": [d.holds_job for d in dead_letters],
    }
    parked = conn.cursor(row_factory=scalar_row).execute(QUERIES["dead_letters_park"], params).fetchone()
    return int(parked or 0)
