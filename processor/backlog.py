"""`outbox backlog`: what the processor has left to do, who is doing it, and how fast."""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from processor import store
from processor.errors import PartitionMissingError
from processor.store import Connection, LockHolder, SubscriptionInfo, WorkerSession
from processor.subscriptions import list_subscriptions


@dataclass(frozen=True, slots=True)
class CheckpointState:
    last_event_id: int | None
    applied_at: dt.datetime | None
    events_applied: int
    done_snapshot: str | None  # None: several partitions (each has its own)
    catching_up_to: str | None


@dataclass(frozen=True, slots=True)
class Consumer:
    """The worker holding a partition's consumer lock."""

    pid: int | None  # its OS pid, from its application_name
    host: str | None
    since: dt.datetime
    backend_pid: int
    # A worker stopped (SIGSTOP, a hung host) keeps its lock; a long idle state shows it.
    idle_seconds: float


@dataclass(frozen=True, slots=True)
class OutboxSize:
    bytes: int
    rows_estimate: int


@dataclass(frozen=True, slots=True)
class TopJob:
    job_id: uuid.UUID
    pending_events: int


@dataclass(frozen=True, slots=True)
class SubscriptionLag:
    name: str
    position: int
    lag_transitions: int
    oldest_unacknowledged: dt.datetime | None
    retrying: int
    parked: int

    @classmethod
    def of(cls, info: SubscriptionInfo) -> SubscriptionLag:
        return cls(info.name, info.position, info.lag, info.oldest_unacknowledged, info.retrying, info.parked)


@dataclass(frozen=True, slots=True)
class PartitionBacklog:
    """One partition's backlog (a line of the report's ``partitions``)."""

    partition: int
    owner_pid: int | None
    owner_host: str | None
    pending_events: int
    oldest_pending_age_seconds: float | None
    events_applied: int
    catching_up: bool
    jobs_awaiting_fold: int
    throughput_events_per_second: float


@dataclass(frozen=True, slots=True)
class BacklogReport:
    partition: int | None  # None: all partitions
    partition_count: int
    pending_events: int
    oldest_pending_age_seconds: float | None
    checkpoint: CheckpointState
    throughput_events_per_second: float
    # The worker of the partition shown (one partition); see `partitions` for each one's.
    consumer: Consumer | None
    standbys: int
    dead_letters: int
    flagged_jobs: int
    jobs_awaiting_fold: int
    # The processor applies what committed between two snapshots: no open transaction holds back
    # other transactions' events (docs/design.md: "Ordering"), so nothing is ever listed here.
    blocking_transactions: tuple[()]
    outbox: OutboxSize
    pending_by_event_type: dict[str, int]
    pending_top_jobs: tuple[TopJob, ...]
    # Each subscription to job transitions: how far behind its consumer is, and what it parked.
    subscriptions: tuple[SubscriptionLag, ...]
    partitions: tuple[PartitionBacklog, ...]


@dataclass(frozen=True, slots=True)
class _PartitionRead:
    """What one partition's reads gave, before the partitions are summed up."""

    line: PartitionBacklog
    checkpoint: CheckpointState
    consumer: Consumer | None
    counts: store.PartitionCounts
    by_event_type: dict[str, int]
    top_jobs: list[TopJob]


def parse_worker_name(application_name: str) -> tuple[str, int] | None:
    """(host, OS pid) from a worker's application_name ``outbox-worker:host:pid``."""
    parts = application_name.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def collect_backlog(conn: Connection, partition: int | None = None) -> BacklogReport:
    """The backlog of one partition, or of all of them (``partitions`` lists each), as of one snapshot."""
    with store.one_snapshot(conn):
        count = store.partitions_get(conn)
        if partition is not None and partition >= count:
            raise PartitionMissingError(partition)
        holders = store.consumer_lock_holders(conn)
        workers = store.worker_sessions_list(conn)
        reads = [
            _read_partition(conn, p, holders.get(p), workers)
            for p in ([partition] if partition is not None else range(count))
        ]
        subscriptions = tuple(SubscriptionLag.of(info) for info in list_subscriptions(conn))
    owners = {holder.pid for holder in holders.values()}
    return _summed(partition, count, reads, standbys=sum(1 for w in workers if w.pid not in owners),
                   subscriptions=subscriptions)  # fmt: skip


def _summed(
    partition: int | None,
    count: int,
    reads: Sequence[_PartitionRead],
    *,
    standbys: int,
    subscriptions: tuple[SubscriptionLag, ...],
) -> BacklogReport:
    """One report from the partitions' reads (one partition's own checkpoint and consumer, if one)."""
    first, single = reads[0], len(reads) == 1
    lines = [r.line for r in reads]
    by_type: Counter[str] = Counter()
    for r in reads:
        by_type.update(r.by_event_type)
    return BacklogReport(
        partition=partition,
        partition_count=count,
        pending_events=sum(line.pending_events for line in lines),
        oldest_pending_age_seconds=max(
            (line.oldest_pending_age_seconds for line in lines if line.oldest_pending_age_seconds is not None),
            default=None,
        ),
        checkpoint=first.checkpoint if single else _checkpoints_summed(reads),
        throughput_events_per_second=round(sum(line.throughput_events_per_second for line in lines), 1),
        consumer=first.consumer if single else None,
        standbys=standbys,
        dead_letters=first.counts.dead_letters,
        flagged_jobs=first.counts.flagged_jobs,
        jobs_awaiting_fold=sum(line.jobs_awaiting_fold for line in lines),
        blocking_transactions=(),
        outbox=OutboxSize(first.counts.outbox_bytes, first.counts.outbox_rows_estimate),
        pending_by_event_type=dict(by_type),
        pending_top_jobs=tuple(
            sorted((job for r in reads for job in r.top_jobs), key=lambda j: -j.pending_events)[:10]
        ),
        subscriptions=subscriptions,
        partitions=tuple(lines),
    )


def _checkpoints_summed(reads: Sequence[_PartitionRead]) -> CheckpointState:
    applied = [r.checkpoint.applied_at for r in reads if r.checkpoint.applied_at is not None]
    return CheckpointState(
        last_event_id=max(r.checkpoint.last_event_id or 0 for r in reads),
        applied_at=max(applied, default=None),
        events_applied=sum(r.checkpoint.events_applied for r in reads),
        done_snapshot=None,
        catching_up_to=None,
    )


def _read_partition(
    conn: Connection, partition: int, holder: LockHolder | None, workers: Sequence[WorkerSession]
) -> _PartitionRead:
    checkpoint = store.checkpoint_get(conn, partition)
    pending = store.events_pending_summary(conn, partition)
    counts = store.backlog_counts_get(conn, partition)
    consumer = _consumer(holder, workers) if holder is not None else None
    cursor = checkpoint.cursor
    state = CheckpointState(
        last_event_id=counts.last_event_id,
        applied_at=counts.applied_at,
        events_applied=checkpoint.events_applied,
        done_snapshot=str(cursor.done),
        catching_up_to=str(cursor.target) if cursor.target else None,
    )
    age = None if pending.oldest_age_seconds is None else round(pending.oldest_age_seconds, 3)
    line = PartitionBacklog(
        partition=partition,
        owner_pid=consumer.pid if consumer else None,
        owner_host=consumer.host if consumer else None,
        pending_events=pending.count,
        oldest_pending_age_seconds=age,
        events_applied=checkpoint.events_applied,
        catching_up=state.catching_up_to is not None,
        jobs_awaiting_fold=pending.jobs_awaiting_fold,
        throughput_events_per_second=round(float(counts.events_per_second), 1),
    )
    top = [TopJob(uuid.UUID(str(job["job_id"])), int(job["pending_events"])) for job in pending.top_jobs]
    return _PartitionRead(line, state, consumer, counts, dict(pending.by_event_type), top)


def _consumer(holder: LockHolder, workers: Sequence[WorkerSession]) -> Consumer:
    host, pid = parse_worker_name(holder.application_name) or (None, None)
    session = next((w for w in workers if w.pid == holder.pid), None)
    idle = session.idle_for if session is not None else None
    return Consumer(
        pid=pid,
        host=host,
        since=holder.since,
        backend_pid=holder.pid,
        idle_seconds=round(idle.total_seconds(), 3) if idle is not None else 0.0,
    )
