"""What the elected worker scans for the gauges of pending work (processor/metrics.py), and the throughput
table's upkeep (processor/election.py)."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg.rows import class_row, scalar_row

from outbox.sqlfile import load_queries
from processor.decode import DeadLetterClass
from processor.store._connection import Connection

QUERIES = load_queries("processor.store", "monitoring.sql")


@dataclass(frozen=True, slots=True)
class _ClassCount:
    reason_class: str
    dead_letters: int


@dataclass(frozen=True, slots=True)
class EventWriter:
    """An open transaction that wrote outbox events: its id, and how long it has been open (None: hidden)."""

    xid: str
    seconds_open: float | None


def dead_letters_count_by_class(conn: Connection) -> dict[DeadLetterClass, int]:
    """Dead letters waiting for retry or discard, by the class of their reason (every class, 0 included)."""
    kinds = list(DeadLetterClass)
    params = {"classes": [str(k) for k in kinds], "prefixes": [k.prefix for k in kinds]}
    counts = dict.fromkeys(kinds, 0)
    cur = conn.cursor(row_factory=class_row(_ClassCount))
    for row in cur.execute(QUERIES["dead_letters_count_by_class"], params).fetchall():
        counts[DeadLetterClass(row.reason_class)] = row.dead_letters
    return counts


def job_flags_count(conn: Connection) -> int:
    value = conn.cursor(row_factory=scalar_row).execute(QUERIES["job_flags_count"]).fetchone()
    return int(value or 0)


def event_writers_list(conn: Connection) -> dict[str, float | None]:
    """The open transactions that wrote outbox events: {transaction id: seconds open, None if hidden}."""
    rows = conn.cursor(row_factory=class_row(EventWriter)).execute(QUERIES["event_writers_list"]).fetchall()
    return {w.xid: w.seconds_open for w in rows}


def throughput_prune(conn: Connection) -> int:
    """Drop the throughput counts older than a day; how many rows."""
    return conn.execute(QUERIES["throughput_prune"]).rowcount
