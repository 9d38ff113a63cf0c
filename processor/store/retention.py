"""What retention runs (processor/retention.py): segments rotated, folded into the baseline and
truncated, fresh statistics afterwards; SQL in retention.sql, the rules of what may go in the
schema's truncate functions."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from enum import StrEnum

from psycopg.rows import class_row, scalar_row

from outbox.sqlfile import load_queries
from processor.snapshot import Snapshot
from processor.store._connection import Connection

QUERIES = load_queries("processor.store", "retention.sql")


class Segmented(StrEnum):
    """The tables partitioned into segments (outbox_segments.relation)."""

    EVENTS = "outbox_events"
    TRANSITIONS = "outbox_job_transitions"


@dataclass(frozen=True, slots=True)
class SegmentSurvey:
    events: int
    unapplied: int
    without_checkpoint: int  # of a partition that has no checkpoint (no worker will apply them)
    young: int  # written at or after the cutoff
    waiting_dead_letters: int
    seen: str  # the snapshot the survey read the segment in (pg_snapshot text)


@dataclass(frozen=True, slots=True)
class FoldedChunk:
    events: int
    baseline_updates: int  # variants whose baseline the chunk moved forward


@dataclass(frozen=True, slots=True)
class SegmentHolder:
    """A session that holds a segment in a long transaction."""

    pid: int
    application_name: str
    state: str | None
    in_transaction_for: dt.timedelta

    def describe(self) -> str:
        return (
            f"pid {self.pid} ({self.application_name or 'no application_name'}, {self.state}) in a transaction "
            f"for {self.in_transaction_for.total_seconds():.0f} s; the next round tries again"
        )


def cutoff_get(conn: Connection, older_than: dt.timedelta) -> dt.datetime:
    """The database's clock minus ``older_than``."""
    row = conn.execute(QUERIES["cutoff_get"], {"interval": older_than}).fetchone()
    assert row is not None
    (cutoff,) = row
    assert isinstance(cutoff, dt.datetime)
    return cutoff


def segments_due(conn: Connection, every: dt.timedelta) -> list[Segmented]:
    """The tables whose current segment holds rows and has been open for ``every`` or longer."""
    with conn.cursor(row_factory=scalar_row) as cur:
        return [Segmented(r) for r in cur.execute(QUERIES["segments_due"], {"every": every}).fetchall()]


def segments_rotate(conn: Connection, table: Segmented) -> int:
    """Close ``table``'s current segment and open the next; its number."""
    with conn.cursor(row_factory=scalar_row) as cur:
        segment = cur.execute(QUERIES["segments_rotate"], {"relation": table.value}).fetchone()
    assert isinstance(segment, int)
    return segment


def segments_closed(conn: Connection, table: Segmented) -> list[int]:
    with conn.cursor(row_factory=scalar_row) as cur:
        return list(cur.execute(QUERIES["segments_closed"], {"relation": table.value}).fetchall())


def segment_holder(conn: Connection, table: Segmented, segment: int, held_for: dt.timedelta) -> SegmentHolder | None:
    """Another session holding ``segment`` in a transaction open for ``held_for`` or more, if any."""
    params = {"relation": table.value, "segment": segment, "held_for": held_for}
    with conn.cursor(row_factory=class_row(SegmentHolder)) as cur:
        return cur.execute(QUERIES["segment_holder"], params).fetchone()


def lock_timeout_local(conn: Connection, timeout: dt.timedelta) -> None:
    """Inside a transaction: a lock not granted within ``timeout`` fails the statement."""
    conn.execute(QUERIES["lock_timeout_local"], {"timeout": f"{max(1, round(timeout.total_seconds() * 1000))}ms"})


def events_segment_survey(conn: Connection, segment: int, *, cutoff: dt.datetime) -> SegmentSurvey:
    with conn.cursor(row_factory=class_row(SegmentSurvey)) as cur:
        survey = cur.execute(QUERIES["events_segment_survey"], {"segment": segment, "cutoff": cutoff}).fetchone()
    assert survey is not None
    return survey


def events_segment_fold(
    conn: Connection, segment: int, *, seen: Snapshot | str, low: uuid.UUID, high: uuid.UUID
) -> FoldedChunk:
    """Fold the segment's events of the variants from ``low`` to ``high`` (inclusive) into the baseline."""
    params = {"segment": segment, "seen": str(seen), "low": low, "high": high}
    with conn.cursor(row_factory=class_row(FoldedChunk)) as cur:
        folded = cur.execute(QUERIES["events_segment_fold"], params).fetchone()
    assert folded is not None
    return folded


def events_segment_truncate(conn: Connection, segment: int, *, seen: str) -> str | None:
    """Truncate a closed segment of events if the schema's rule allows it; None, or why not."""
    with conn.cursor(row_factory=scalar_row) as cur:
        refusal = cur.execute(QUERIES["events_segment_truncate"], {"segment": segment, "seen": seen}).fetchone()
    assert refusal is None or isinstance(refusal, str)
    return refusal


def transitions_segment_count(conn: Connection, segment: int) -> int:
    with conn.cursor(row_factory=scalar_row) as cur:
        count = cur.execute(QUERIES["transitions_segment_count"], {"segment": segment}).fetchone()
    assert isinstance(count, int)
    return count


def transitions_segment_truncate(conn: Connection, segment: int, *, cutoff: dt.datetime) -> str | None:
    """Truncate a closed segment of transitions if the schema's rule allows it; None, or why not."""
    with conn.cursor(row_factory=scalar_row) as cur:
        refusal = cur.execute(
            QUERIES["transitions_segment_truncate"], {"segment": segment, "cutoff": cutoff}
        ).fetchone()
    assert refusal is None or isinstance(refusal, str)
    return refusal


def outbox_analyze(conn: Connection) -> None:
    """Fresh statistics for the planner and for `outbox backlog`'s size estimate."""
    conn.execute(QUERIES["outbox_analyze"])
