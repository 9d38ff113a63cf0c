"""`outbox check`: one probe for monitoring, failing on anything that needs a person.

Each check is read-only and cheap enough to run every minute: the schema's version, the product's
triggers, legacy writers of job state and the cast functions' fit, the age of the oldest pending
work, partitions whose work waits with no worker, flagged jobs, dead letters, and subscriptions
that fall behind or parked a transition.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from processor import app_schema, schema_check, store
from processor.errors import SchemaError
from processor.migrate import check_ready
from processor.store import Connection
from processor.subscriptions import list_subscriptions


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class HealthReport:
    checks: tuple[Check, ...]
    error: str | None = None  # the probe itself failed (the database unreachable, ...)

    @property
    def ok(self) -> bool:
        return self.error is None and all(c.ok for c in self.checks)


def run_checks(conn: Connection, *, max_lag: float) -> HealthReport:
    try:
        check_ready(conn)
    except SchemaError as exc:
        if "legacy trigger" not in str(exc):
            return HealthReport((Check("schema", False, str(exc)),))
    checks = [Check("schema", True, "migrated, with a pipeline"), *_schema_checks(conn)]
    with store.one_snapshot(conn):
        checks.append(_lag_check(conn, max_lag))
        checks.append(_workers_check(conn, max_lag))
        counts = store.health_counts_get(conn)
        checks.extend(_count_checks(counts))
        checks.append(_subscriptions_check(conn, max_lag, counts.now))
    return HealthReport(tuple(checks))


def _schema_checks(conn: Connection) -> list[Check]:
    triggers = schema_check.trigger_problems(conn)
    legacy = schema_check.legacy_triggers(conn)
    casts = app_schema.cast_problems(conn)
    return [
        Check("triggers", not triggers, "; ".join(p.describe() for p in triggers) or "the product's triggers fire"),
        Check("legacy writers", not legacy, "; ".join(t.describe() for t in legacy) or "no other writer of job state"),
        Check("column types", not casts, "; ".join(casts) or "the casts fit the columns"),
    ]


def _lag_check(conn: Connection, max_lag: float) -> Check:
    pending = store.events_pending_summary(conn, None, top=0)
    lag = pending.oldest_age_seconds
    return Check(
        "lag",
        lag is None or lag <= max_lag,
        "nothing pending"
        if lag is None
        else f"oldest pending work {lag:.1f} s old ({pending.count} events, "
        f"{pending.jobs_awaiting_fold} jobs to fold; limit {max_lag:g} s)",
    )


def _workers_check(conn: Connection, max_lag: float) -> Check:
    # A partition without a worker fails only once its work has waited longer than max_lag: a
    # rolling restart, or work that arrived a moment before a worker took the partition, is no failure.
    holders = store.consumer_lock_holders(conn)
    idle = []
    for p in range(store.partitions_get(conn)):
        if p not in holders:
            age = store.events_pending_summary(conn, p, top=0).oldest_age_seconds
            if age is not None and age > max_lag:
                idle.append(p)
    return Check(
        "workers",
        not idle,
        f"partitions with work pending over {max_lag:g} s and no worker: {', '.join(map(str, idle))} "
        "(is `outbox run` running?)"
        if idle
        else "no partition's work waits without a worker",
    )


def _count_checks(counts: store.HealthCounts) -> list[Check]:
    flagged, dead = counts.flagged_jobs, counts.dead_letters
    return [
        Check("flagged jobs", flagged == 0, f"{flagged} flagged jobs (see `outbox verify`)" if flagged else "none"),
        Check("dead letters", dead == 0, f"{dead} dead letters (see `outbox dead-letters list`)" if dead else "none"),
    ]


def _subscriptions_check(conn: Connection, max_lag: float, now: dt.datetime) -> Check:
    # A subscription fails the probe when its handler gave up on a transition, or when what it
    # has not acknowledged waited longer than max_lag (is its consumer running?).
    troubled = [
        f"{s.name}: {s.parked} parked (`outbox subscriptions failures {s.name}`)"
        if s.parked
        else f"{s.name}: {s.lag} transitions waiting, the oldest {_age(s.oldest_unacknowledged, now)} s"
        for s in list_subscriptions(conn)
        if s.parked or (s.oldest_unacknowledged is not None and _age(s.oldest_unacknowledged, now) > max_lag)
    ]
    return Check("subscriptions", not troubled, "; ".join(troubled) or "every subscription keeps up")


def _age(at: dt.datetime | None, now: dt.datetime) -> float:
    return round((now - at).total_seconds(), 1) if at is not None else 0.0
