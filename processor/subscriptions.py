"""Subscriptions as an operator manages them: create, list (with lag), reset, drop, failures, retry."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from outbox.subscription import QUERIES, Transition, check_name
from processor.errors import OutboxError
from processor.store import Connection

STATUSES = ("queued", "running", "done", "failed")
LAG_COUNT_LIMIT = 1_000_000  # lag is counted up to this (an index range); more reads as "at least"


class SubscriptionError(OutboxError):
    """A subscription command that cannot be done (unknown name, name taken, bad value)."""


@dataclass(frozen=True)
class SubscriptionInfo:
    name: str
    position: int
    to_statuses: list[str] | None
    created_at: dt.datetime
    acknowledged_at: dt.datetime | None
    lag: int  # transitions after the position that pass the filter (up to LAG_COUNT_LIMIT)
    oldest_unacknowledged: dt.datetime | None
    parked: int
    retrying: int
    head: int  # the newest transition

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("created_at", "acknowledged_at", "oldest_unacknowledged"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


def parse_statuses(value: str | None) -> list[str] | None:
    if value is None or not value.strip():
        return None
    statuses = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in statuses if s not in STATUSES]
    if unknown:
        raise SubscriptionError(f"unknown status {unknown[0]!r}; statuses are {', '.join(STATUSES)}")
    return statuses


def create(conn: Connection, name: str, *, from_start: bool, to_statuses: list[str] | None) -> int:
    name = checked_name(name)
    row = conn.execute(
        QUERIES["subscription_create"], {"name": name, "from_start": from_start, "to_statuses": to_statuses}
    ).fetchone()
    if row is None:
        raise SubscriptionError(f"subscription {name!r} exists already (`outbox subscriptions reset` moves it)")
    return int(row[0])


def list_subscriptions(conn: Connection, name: str | None = None) -> list[SubscriptionInfo]:
    rows = conn.execute(QUERIES["subscriptions_list"], {"name": name, "count_limit": LAG_COUNT_LIMIT}).fetchall()
    return [
        SubscriptionInfo(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9] or 0)
        for row in rows
    ]


def reset(conn: Connection, name: str, to: str) -> int:
    name = checked_name(name)
    if to not in ("start", "now") and not (to.isdigit() and int(to) < 2**63):
        raise SubscriptionError(f"--to must be start, now or a transition id (got {to!r})")
    row = conn.execute(QUERIES["subscription_reset"], {"name": name, "to": to}).fetchone()
    if row is None:
        raise _unknown(name)
    return int(row[0])


def drop(conn: Connection, name: str) -> None:
    name = checked_name(name)
    if conn.execute(QUERIES["subscription_drop"], {"name": name}).fetchone() is None:
        raise _unknown(name)


def failures(conn: Connection, name: str) -> list[dict[str, Any]]:
    name = checked_name(name)
    if not list_subscriptions(conn, name):
        raise _unknown(name)
    rows = conn.execute(QUERIES["subscription_failures_list"], {"name": name}).fetchall()
    keys = ("transition_id", "attempts", "last_error", "failed_at", "parked_at", "job_id", "to_status", "to_step")
    out = []
    for row in rows:
        item = dict(zip(keys, row, strict=True))
        for key in ("failed_at", "parked_at"):
            item[key] = item[key].isoformat() if item[key] else None
        item["job_id"] = str(item["job_id"]) if item["job_id"] else None
        out.append(item)
    return out


def retry(conn: Connection, name: str, transition_id: int | None) -> list[int]:
    """Give parked transitions back to the consumer (all of them, or one); the ids given back."""
    name = checked_name(name)
    if not list_subscriptions(conn, name):
        raise _unknown(name)
    rows = conn.execute(QUERIES["subscription_unpark"], {"name": name, "transition_id": transition_id}).fetchall()
    return [row[0] for row in rows]


def transitions(conn: Connection, *, after: int, job_id: uuid.UUID | None, limit: int) -> list[Transition]:
    rows = conn.execute(QUERIES["transitions_list"], {"after": after, "job_id": job_id, "limit": limit}).fetchall()
    return [Transition(*row) for row in rows]


def checked_name(name: str) -> str:
    try:
        return check_name(name)
    except ValueError as exc:
        raise SubscriptionError(str(exc)) from None


def _unknown(name: str) -> SubscriptionError:
    return SubscriptionError(f"no subscription named {name!r} (`outbox subscriptions list`)")
