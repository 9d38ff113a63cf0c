"""Retention: applied events and acknowledged transitions leave by whole segments (decision 0015).

outbox_events and outbox_job_transitions are partitioned into segments; writers append to the current
one. One round of retention (``retain``: `outbox prune`, or OUTBOX_RETENTION in one elected worker):

1. **Rotate.** A current segment that holds rows and has been open for a quarter of the retention
   period is closed, and writers move to a free (or new) segment. Events therefore stay between
   the period and 1.25 times it; a prune with a period of 0 closes the current segment at once.
2. **Fold, then truncate, each closed segment of events.** A survey reads the segment: are all its
   events applied, older than the cutoff, and free of dead letters waiting for a retry? If so, its
   events are folded into outbox_variant_baseline (where replay starts: the newest state of each
   variant wins, so a fold that is never followed by the truncate changes nothing), one range of
   variant ids per short transaction (about 50,000 events), from the survey's snapshot: each
   variant's baseline row is written at most once per segment, and only when the segment moves it
   forward. Then one short
   transaction truncates it, under every checkpoint's lock and the segment's ACCESS EXCLUSIVE lock,
   if outbox_events_segment_truncate (the schema's one rule of what may go) finds that no event
   came into it since the survey.
3. **Truncate each closed segment of transitions** that every subscription acknowledged, that none
   failed on, and whose transitions are all older than the cutoff.

A segment that cannot go yet stays, whole, with the reason in the report; the next round tries it
again. Nothing is deleted row by row: the truncate leaves no dead tuple and writes a few kilobytes of
WAL whatever the segment held (the fold writes at most one baseline row per variant), and no writer
waits for it (writers only ever lock the current segment). Its waits are bounded: a segment that a
session has held for over a second in an open transaction (it read the outbox and stays idle) is
left alone, unfolded; the checkpoints are waited for at most ``lock_timeout`` (a worker finishing
its batch), the segment's own lock at most 50 ms once they are held (the workers wait meanwhile).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from processor import store
from processor.database import DatabaseUrl, connect, redact
from processor.election import Election
from processor.errors import ConfigurationError
from processor.store import ClusterDuty, Connection, Segmented

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

# How long a round waits for a segment's lock (or the lock to attach a new segment) before it
# leaves that segment to the next round. Everything queued behind the request waits as long.
LOCK_TIMEOUT = dt.timedelta(milliseconds=500)
# Events folded into the baseline per transaction (about: the segment is cut into ranges of
# variant ids, each variant in one of them).
FOLD_CHUNK = 50_000
# A segment that a session has held in a transaction open for longer than this is left to the next
# round without being folded (a session idle in its transaction after reading the outbox).
HELD_FOR = dt.timedelta(seconds=1)


def parse_duration(text: str) -> dt.timedelta:
    """'90s', '30m', '12h', '7d', '2w'."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigurationError(f"duration {text!r} is not a number followed by s, m, h, d or w (e.g. 7d)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds > 100 * 365 * 86400:
        raise ConfigurationError(f"duration {text!r} is longer than 100 years")
    return dt.timedelta(seconds=seconds)


@dataclass(frozen=True, slots=True)
class SegmentOutcome:
    """What one round did with one closed segment."""

    table: Segmented
    segment: int
    rows: int
    kept_because: str | None = None  # None: truncated

    @property
    def removed(self) -> int:
        return 0 if self.kept_because else self.rows


@dataclass(frozen=True, slots=True)
class RetentionReport:
    older_than: dt.timedelta
    rotated: tuple[Segmented, ...]
    segments: tuple[SegmentOutcome, ...]
    baseline_updates: int

    def removed(self, table: Segmented) -> int:
        return sum(s.removed for s in self.segments if s.table is table)

    def kept(self) -> list[SegmentOutcome]:
        return [s for s in self.segments if s.kept_because]


def retain(
    conn: Connection,
    older_than: dt.timedelta,
    *,
    chunk_size: int = FOLD_CHUNK,
    lock_timeout: dt.timedelta = LOCK_TIMEOUT,
    on_events: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> RetentionReport:
    """One round of retention (the module's docstring). ``chunk_size``: events folded per
    transaction (about); ``on_events`` sees how many events each of those folded; ``stop`` ends the round
    between two transactions (a worker that stops)."""
    return _Round(conn, older_than, chunk_size, lock_timeout, on_events, stop).run()


@dataclass
class _Round:
    conn: Connection
    older_than: dt.timedelta
    chunk_size: int
    lock_timeout: dt.timedelta
    on_events: Callable[[int], None] | None
    stop: threading.Event | None
    rotated: list[Segmented] = field(default_factory=list)
    segments: list[SegmentOutcome] = field(default_factory=list)
    baseline_updates: int = 0

    def run(self) -> RetentionReport:
        conn = self.conn
        cutoff = store.cutoff_get(conn, self.older_than)
        for table in store.segments_due(conn, self.older_than / 4):
            if self._rotate(table):
                self.rotated.append(table)
        for segment in store.segments_closed(conn, Segmented.EVENTS):
            if not self._stopped():
                self.segments.append(self._events_segment(segment, cutoff))
        for segment in store.segments_closed(conn, Segmented.TRANSITIONS):
            if not self._stopped():
                self.segments.append(self._transitions_segment(segment, cutoff))
        store.throughput_prune(conn)
        report = RetentionReport(self.older_than, tuple(self.rotated), tuple(self.segments), self.baseline_updates)
        if report.removed(Segmented.EVENTS):
            store.outbox_analyze(conn)  # `backlog` reports the outbox's size from its statistics
        return report

    def _stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def _rotate(self, table: Segmented) -> bool:
        try:
            with self.conn.transaction():
                store.lock_timeout_local(self.conn, self.lock_timeout)
                segment = store.segments_rotate(self.conn, table)
        except psycopg.errors.LockNotAvailable:
            log.info("%s: the next segment waits for a lock; the next round opens it", table.value)
            return False
        log.info("%s: writers now append to segment %d", table.value, segment)
        return True

    def _events_segment(self, segment: int, cutoff: dt.datetime) -> SegmentOutcome:
        def kept(rows: int, why: str) -> SegmentOutcome:
            return SegmentOutcome(Segmented.EVENTS, segment, rows, why)

        holder = store.segment_holder(self.conn, Segmented.EVENTS, segment, HELD_FOR)
        survey = store.events_segment_survey(self.conn, segment, cutoff=cutoff)
        if holder is not None:  # not folded for nothing, nor waited for with every checkpoint held
            return kept(survey.events, f"a session holds it: {holder.describe()}")
        if survey.unapplied:
            return kept(survey.events, f"{survey.unapplied} of its events are not applied yet")
        if survey.without_checkpoint:
            orphans = survey.without_checkpoint
            return kept(survey.events, f"{orphans} of its events are of a partition with no checkpoint (see backlog)")
        if survey.young:
            return kept(survey.events, f"{survey.young} of its events are younger than the cutoff")
        if survey.waiting_dead_letters:
            return kept(
                survey.events, f"{survey.waiting_dead_letters} dead letters in it wait for a retry or a discard"
            )
        for low, high in variant_ranges(math.ceil(survey.events / self.chunk_size)):
            if self._stopped():
                return kept(survey.events, "the round was stopped")
            with self.conn.transaction():
                chunk = store.events_segment_fold(self.conn, segment, seen=survey.seen, low=low, high=high)
            self.baseline_updates += chunk.baseline_updates
            if self.on_events is not None:
                self.on_events(chunk.events)
        refusal = self._truncate(lambda: store.events_segment_truncate(self.conn, segment, seen=survey.seen))
        return SegmentOutcome(Segmented.EVENTS, segment, survey.events, refusal)

    def _transitions_segment(self, segment: int, cutoff: dt.datetime) -> SegmentOutcome:
        rows = store.transitions_segment_count(self.conn, segment)
        holder = store.segment_holder(self.conn, Segmented.TRANSITIONS, segment, HELD_FOR)
        if holder is not None:
            return SegmentOutcome(Segmented.TRANSITIONS, segment, rows, f"a session holds it: {holder.describe()}")
        refusal = self._truncate(lambda: store.transitions_segment_truncate(self.conn, segment, cutoff=cutoff))
        return SegmentOutcome(Segmented.TRANSITIONS, segment, rows, refusal)

    def _truncate(self, truncate: Callable[[], str | None]) -> str | None:
        try:
            with self.conn.transaction():
                store.lock_timeout_local(self.conn, self.lock_timeout)
                return truncate()
        except psycopg.errors.LockNotAvailable:
            return "a session held it, or a checkpoint, past the lock timeout; the next round tries again"


def variant_ranges(count: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """``count`` (at least one) inclusive ranges of variant ids that cover every UUID, in order:
    random UUIDs spread evenly over them, and a range of UUIDs of another kind (sequential ones) is
    only larger, never wrong (PostgreSQL orders UUIDs as UUID.int does: by their bytes)."""
    count = max(1, count)
    bounds = [(i << 128) // count for i in range(count + 1)]
    return [(uuid.UUID(int=bounds[i]), uuid.UUID(int=bounds[i + 1] - 1)) for i in range(count)]


# ----- OUTBOX_RETENTION: one worker of the cluster runs it


def retention_every(older_than: dt.timedelta) -> float:
    """Seconds between two rounds: an eighth of the period, between 1 s and 10 minutes."""
    return min(600.0, max(1.0, older_than.total_seconds() / 8))


def run_retention(db: DatabaseUrl, older_than: dt.timedelta, stop: threading.Event) -> None:
    """Until ``stop``: a round of retention every ``retention_every`` seconds while this process holds
    the retention election (run in a thread, on a connection of its own, so that a long fold never
    holds up the worker's batches)."""
    conn: Connection | None = None
    election = Election(ClusterDuty.RETENTION)
    every = retention_every(older_than)
    while not stop.is_set():
        try:
            if conn is None or conn.closed:
                conn = connect(db, application_name="outbox-retention")
            if election.holds(conn):
                report = retain(conn, older_than, stop=stop)
                _log_round(report)
        except Exception as exc:  # the database may be away; the worker reports that itself
            log.warning("retention round failed: %s", redact(str(exc).strip().split("\n")[0] or type(exc).__name__, db))
            if conn is not None:
                conn.close()
            conn = None
            election.forget()
        stop.wait(every)
    if conn is not None:
        conn.close()


def _log_round(report: RetentionReport) -> None:
    events, transitions = report.removed(Segmented.EVENTS), report.removed(Segmented.TRANSITIONS)
    if events or transitions:
        log.info("retention removed %d events and %d transitions", events, transitions)
    for kept in report.kept():
        log.debug(
            "retention keeps %s segment %d (%d rows): %s", kept.table.value, kept.segment, kept.rows, kept.kept_because
        )
