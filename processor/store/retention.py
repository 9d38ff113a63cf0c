"""What `outbox prune` runs: applied events folded into the baseline and deleted, job transitions no
subscription still needs, fresh statistics afterwards; SQL in retention.sql."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from psycopg.rows import class_row

from outbox.sqlfile import load_queries
from processor.snapshot import Snapshot
from processor.store._connection import Connection

QUERIES = load_queries("processor.store", "retention.sql")


@dataclass(frozen=True, slots=True)
class PrunedRound:
    events_deleted: int
    baseline_updates: int  # variants whose baseline the round's events changed


def cutoff_get(conn: Connection, older_than: dt.timedelta) -> dt.datetime:
    """The database's clock minus ``older_than``."""
    row = conn.execute(QUERIES["cutoff_get"], {"interval": older_than}).fetchone()
    assert row is not None
    (cutoff,) = row
    assert isinstance(cutoff, dt.datetime)
    return cutoff


def events_lock_for_prune(conn: Connection) -> None:
    conn.execute(QUERIES["events_lock_for_prune"])


def prune_chunk(conn: Connection, partition: int, *, cutoff: dt.datetime, done: Snapshot, limit: int) -> PrunedRound:
    """Fold up to ``limit`` prunable events into the baseline and delete them."""
    params = {"partition": partition, "cutoff": cutoff, "done": str(done), "limit": limit}
    with conn.cursor(row_factory=class_row(PrunedRound)) as cur:
        pruned = cur.execute(QUERIES["prune_chunk"], params).fetchone()
    assert pruned is not None
    return pruned


def transitions_prune(conn: Connection, *, cutoff: dt.datetime, limit: int) -> int:
    """Delete up to ``limit`` transitions older than ``cutoff`` that no subscription still needs; how many."""
    return conn.execute(QUERIES["transitions_prune"], {"cutoff": cutoff, "limit": limit}).rowcount


def outbox_analyze(conn: Connection) -> None:
    """Fresh statistics for the planner and for `outbox backlog`'s size estimate."""
    conn.execute(QUERIES["outbox_analyze"])
