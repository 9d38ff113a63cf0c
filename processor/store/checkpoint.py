"""Each partition's checkpoint: read, locked (the fence of every batch and operation) and moved."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from psycopg.rows import class_row

from outbox.sqlfile import load_queries
from processor.errors import PartitionMissingError
from processor.snapshot import Cursor
from processor.store._connection import Connection

QUERIES = load_queries("processor.store", "checkpoint.sql")


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
class _CheckpointRow:
    done: str
    target: str | None
    after_txid: str
    after_event_id: int
    events_applied: int
    updated_at: dt.datetime | None
    fold_config_version: int

    def checkpoint(self) -> Checkpoint:
        cursor = Cursor.from_row(self.done, self.target, self.after_txid, self.after_event_id)
        return Checkpoint(cursor, self.events_applied, self.updated_at, self.fold_config_version)


@dataclass(frozen=True, slots=True)
class _LockedRow:
    partition: int
    done: str
    target: str | None
    after_txid: str
    after_event_id: int
    fold_config_version: int

    def locked(self) -> LockedCheckpoint:
        cursor = Cursor.from_row(self.done, self.target, self.after_txid, self.after_event_id)
        return LockedCheckpoint(self.partition, cursor, self.fold_config_version)


def checkpoint_get(conn: Connection, partition: int) -> Checkpoint:
    with conn.cursor(row_factory=class_row(_CheckpointRow)) as cur:
        row = cur.execute(QUERIES["checkpoint_get"], {"partition": partition}).fetchone()
    if row is None:
        raise PartitionMissingError(partition)
    return row.checkpoint()


def checkpoint_lock(conn: Connection, partition: int) -> LockedCheckpoint:
    with conn.cursor(row_factory=class_row(_LockedRow)) as cur:
        row = cur.execute(QUERIES["checkpoint_lock"], {"partition": partition}).fetchone()
    if row is None:
        raise PartitionMissingError(partition)
    return row.locked()


def checkpoints_lock_all(conn: Connection) -> dict[int, LockedCheckpoint]:
    """Lock every partition's checkpoint, in partition order (see the query), inside a transaction.

    A statement that waited for a lock sees the rows of its own snapshot, taken before the wait: if
    it waited for `outbox repartition`, the checkpoints that one created are not among them. So the
    lock is taken again, by a new statement, until two in a row find the same partitions.
    """
    locked: dict[int, LockedCheckpoint] = {}
    while True:
        with conn.cursor(row_factory=class_row(_LockedRow)) as cur:
            rows = cur.execute(QUERIES["checkpoints_lock_all"]).fetchall()
        again = {row.partition: row.locked() for row in rows}
        if again.keys() == locked.keys():
            return again
        locked = again


def batch_commit(
    conn: Connection,
    partition: int,
    *,
    cursor: Cursor,
    event_count: int,
    last_event_id: int | None = None,
) -> CommitResult:
    """Move the checkpoint past the batch and count it (the batch's last statement)."""
    with conn.cursor(row_factory=class_row(CommitResult)) as cur:
        row = cur.execute(
            QUERIES["batch_commit"],
            {
                "partition": partition,
                "event_count": event_count,
                "last_applied_event_id": last_event_id,
                **cursor.params(),
            },
        ).fetchone()
    assert row is not None
    return row
