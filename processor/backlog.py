"""`outbox backlog`: what the processor has left to do, who is doing it, and how fast."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Console
from rich.table import Table

from processor import store
from processor.errors import PartitionMissingError
from processor.store import QUERIES, Connection
from processor.subscriptions import list_subscriptions


def parse_worker_name(application_name: str) -> tuple[str, int] | None:
    """(host, OS pid) from a worker's application_name ``outbox-worker:host:pid``."""
    parts = application_name.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def collect_backlog(conn: Connection, partition: int | None = None) -> dict[str, Any]:
    """The backlog of one partition, or of all of them (``partitions`` lists each), as of one snapshot."""
    with store.one_snapshot(conn):
        return _collect(conn, partition)


def _collect(conn: Connection, partition: int | None) -> dict[str, Any]:
    count = store.partitions_get(conn)
    if partition is not None and partition >= count:
        raise PartitionMissingError(partition)
    holders = store.consumer_lock_holders(conn)
    workers = conn.execute(QUERIES["backlog_workers"]).fetchall()
    reports = [
        _partition_backlog(conn, p, holders.get(p), workers)
        for p in ([partition] if partition is not None else range(count))
    ]
    ages = [r["oldest_pending_age_seconds"] for r in reports if r["oldest_pending_age_seconds"] is not None]
    first = reports[0]
    single = len(reports) == 1
    by_type: dict[str, int] = {}
    for report in reports:
        for event_type, n in report["pending_by_event_type"].items():
            by_type[event_type] = by_type.get(event_type, 0) + n
    owners = {holder.pid for holder in holders.values()}
    return {
        "partition": partition,
        "partition_count": count,
        "pending_events": sum(r["pending_events"] for r in reports),
        "oldest_pending_age_seconds": max(ages, default=None),
        "checkpoint": first["checkpoint"]
        if single
        else {
            "last_event_id": max((r["checkpoint"]["last_event_id"] or 0 for r in reports), default=None),
            "applied_at": max((r["checkpoint"]["applied_at"] or "" for r in reports), default="") or None,
            "events_applied": sum(r["checkpoint"]["events_applied"] for r in reports),
            "done_snapshot": None,
            "catching_up_to": None,
        },
        "throughput_events_per_second": round(sum(r["throughput_events_per_second"] for r in reports), 1),
        # The worker of the partition shown (one partition); see `partitions` for each one's.
        "consumer": first["consumer"] if single else None,
        "standbys": sum(1 for w in workers if w[0] not in owners),
        "dead_letters": first["dead_letters"],
        "flagged_jobs": first["flagged_jobs"],
        "jobs_awaiting_fold": sum(r["jobs_awaiting_fold"] for r in reports),
        # The processor applies what committed between two snapshots: no open transaction holds
        # back other transactions' events (README: "Ordering"), so nothing is ever listed here.
        "blocking_transactions": [],
        "outbox": first["outbox"],
        "pending_by_event_type": by_type,
        "pending_top_jobs": sorted(
            (job for r in reports for job in r["pending_top_jobs"]), key=lambda j: -j["pending_events"]
        )[:10],
        # Each subscription to job transitions: how far behind its consumer is, and what it parked.
        "subscriptions": [
            {
                "name": info.name,
                "position": info.position,
                "lag_transitions": info.lag,
                "oldest_unacknowledged": _iso(info.oldest_unacknowledged),
                "retrying": info.retrying,
                "parked": info.parked,
            }
            for info in list_subscriptions(conn)
        ],
        "partitions": [
            {
                "partition": r["partition"],
                "owner_pid": r["consumer"]["pid"] if r["consumer"] else None,
                "owner_host": r["consumer"]["host"] if r["consumer"] else None,
                "pending_events": r["pending_events"],
                "oldest_pending_age_seconds": r["oldest_pending_age_seconds"],
                "events_applied": r["checkpoint"]["events_applied"],
                "catching_up": r["checkpoint"]["catching_up_to"] is not None,
                "jobs_awaiting_fold": r["jobs_awaiting_fold"],
                "throughput_events_per_second": r["throughput_events_per_second"],
            }
            for r in reports
        ],
    }


def _partition_backlog(
    conn: Connection, partition: int, holder: store.LockHolder | None, workers: list[Any]
) -> dict[str, Any]:
    checkpoint = store.checkpoint_get(conn, partition)
    pending = store.events_pending_summary(conn, partition)
    counts = conn.execute(QUERIES["backlog_counts"], {"partition": partition}).fetchone()
    assert counts is not None
    consumer = None
    if holder is not None:
        host, pid = parse_worker_name(holder.application_name) or (None, None)
        active = next((w for w in workers if w[0] == holder.pid), None)
        consumer = {
            "pid": pid,
            "host": host,
            "since": _iso(holder.since),
            "backend_pid": holder.pid,
            # A worker stopped (SIGSTOP, a hung host) keeps its lock; a long idle state shows it.
            "idle_seconds": round(active[4].total_seconds(), 3) if active and active[3] == "idle" else 0.0,
        }
    cursor = checkpoint.cursor
    return {
        "partition": partition,
        "pending_events": pending.count,
        "oldest_pending_age_seconds": None
        if pending.oldest_age_seconds is None
        else round(pending.oldest_age_seconds, 3),
        "checkpoint": {
            "last_event_id": counts[6],
            "applied_at": _iso(counts[7]),
            "events_applied": checkpoint.events_applied,
            "done_snapshot": str(cursor.done),
            "catching_up_to": str(cursor.target) if cursor.target else None,
        },
        "throughput_events_per_second": round(float(counts[5]), 1),
        "consumer": consumer,
        "dead_letters": counts[0],
        "flagged_jobs": counts[1],
        "jobs_awaiting_fold": pending.jobs_waiting,
        "outbox": {"bytes": counts[3], "rows_estimate": counts[4]},
        "pending_by_event_type": pending.by_event_type,
        "pending_top_jobs": pending.top_jobs,
    }


def render_backlog(report: dict[str, Any], console: Console) -> None:
    which = "all partitions" if report["partition"] is None else f"partition {report['partition']}"
    table = Table(
        title=f"outbox backlog ({which} of {report['partition_count']})", show_header=False, title_justify="left"
    )
    table.add_column(style="bold")
    table.add_column()
    consumer = report["consumer"]
    age = report["oldest_pending_age_seconds"]
    rows = [
        ("pending events", f"{report['pending_events']:,}"),
        ("oldest pending", "-" if age is None else f"{age:.1f} s"),
        ("throughput", f"{report['throughput_events_per_second']:,.1f} events/s (last minute)"),
        ("last applied", f"event {report['checkpoint']['last_event_id']} at {report['checkpoint']['applied_at']}"),
        ("events applied", f"{report['checkpoint']['events_applied']:,}"),
        (
            "consumer",
            "see partitions"
            if len(report["partitions"]) > 1
            else "none"
            if consumer is None
            else f"pid {consumer['pid']} on {consumer['host']} since {consumer['since']}",
        ),
        ("standbys", str(report["standbys"])),
        ("dead letters", str(report["dead_letters"])),
        ("flagged jobs", str(report["flagged_jobs"])),
        ("jobs awaiting fold", str(report["jobs_awaiting_fold"])),
        ("outbox size", f"{report['outbox']['bytes'] / 1e6:,.1f} MB, ~{report['outbox']['rows_estimate']:,} rows"),
        ("pending by type", ", ".join(f"{k}: {v}" for k, v in report["pending_by_event_type"].items()) or "-"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if len(report["partitions"]) > 1:
        parts = Table(
            "partition", "owner (pid@host)", "pending", "oldest pending", "events applied", "events/s",
            title="partitions", title_justify="left",
        )  # fmt: skip
        for item in report["partitions"]:
            owner = f"{item['owner_pid']}@{item['owner_host']}" if item["owner_pid"] is not None else "none"
            age = item["oldest_pending_age_seconds"]
            parts.add_row(
                str(item["partition"]), owner, f"{item['pending_events']:,}", "-" if age is None else f"{age:.1f} s",
                f"{item['events_applied']:,}", f"{item['throughput_events_per_second']:,.1f}",
            )  # fmt: skip
        console.print(parts)
    if report["pending_top_jobs"]:
        top = Table("job", "pending events", title="jobs with the most pending events", title_justify="left")
        for item in report["pending_top_jobs"]:
            top.add_row(str(item["job_id"]), str(item["pending_events"]))
        console.print(top)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None
