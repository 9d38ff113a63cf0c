"""`outbox backlog`: what the processor has left to do, who is doing it, and how fast."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Console
from rich.table import Table

from processor import store
from processor.store import QUERIES, Connection


def parse_worker_name(application_name: str) -> tuple[str, int] | None:
    """(host, OS pid) from a worker's application_name ``outbox-worker:host:pid``."""
    parts = application_name.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def collect_backlog(conn: Connection, partition: int) -> dict[str, Any]:
    checkpoint = store.checkpoint_get(conn, partition)
    pending = store.events_pending_summary(conn, partition, checkpoint.cursor)
    counts = conn.execute(QUERIES["backlog_counts"], {"partition": partition}).fetchone()
    assert counts is not None
    holder = store.consumer_lock_holder(conn, partition)
    workers = conn.execute(QUERIES["backlog_workers"]).fetchall()

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
        "standbys": sum(1 for w in workers if holder is None or w[0] != holder.pid),
        "dead_letters": counts[0],
        "flagged_jobs": counts[1],
        "jobs_awaiting_fold": counts[2],
        # The processor applies what committed between two snapshots: no open transaction holds
        # back other transactions' events (README: "Ordering"), so nothing is ever listed here.
        "blocking_transactions": [],
        "outbox": {"bytes": counts[3], "rows_estimate": counts[4]},
        "pending_by_event_type": pending.by_event_type,
        "pending_top_jobs": pending.top_jobs,
    }


def render_backlog(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"outbox backlog (partition {report['partition']})", show_header=False, title_justify="left")
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
            "none" if consumer is None else f"pid {consumer['pid']} on {consumer['host']} since {consumer['since']}",
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
    if report["pending_top_jobs"]:
        top = Table("job", "pending events", title="jobs with the most pending events", title_justify="left")
        for item in report["pending_top_jobs"]:
            top.add_row(str(item["job_id"]), str(item["pending_events"]))
        console.print(top)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None
