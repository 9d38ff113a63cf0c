"""Job transitions and their subscriptions as an operator manages them (`outbox subscriptions ...`,
`outbox transitions`, `outbox explain`); SQL in transitions.sql. A consumer's own statements
(outbox.Subscriber) stay in outbox/transitions.sql."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from psycopg.rows import class_row

from outbox.sqlfile import load_queries
from outbox.subscription import Transition
from processor.store._connection import Connection

QUERIES = load_queries("processor.store", "transitions.sql")


@dataclass(frozen=True, slots=True)
class SubscriptionInfo:
    name: str
    position: int
    to_statuses: list[str] | None
    created_at: dt.datetime
    acknowledged_at: dt.datetime | None
    lag: int  # transitions after the position that pass the filter (up to the count limit)
    oldest_unacknowledged: dt.datetime | None
    parked: int
    retrying: int
    head: int  # the newest transition (0: none yet)


@dataclass(frozen=True, slots=True)
class SubscriptionFailure:
    """A transition a subscription's handler failed on: retrying, or parked (``parked_at``)."""

    transition_id: int
    attempts: int
    last_error: str
    failed_at: dt.datetime | None
    parked_at: dt.datetime | None
    job_id: uuid.UUID | None  # None: the transition was pruned
    to_status: str | None
    to_step: str | None


def subscription_create(conn: Connection, name: str, *, from_start: bool, to_statuses: list[str] | None) -> int | None:
    """The new subscription's position; None if the name is taken."""
    row = conn.execute(
        QUERIES["subscription_create"], {"name": name, "from_start": from_start, "to_statuses": to_statuses}
    ).fetchone()
    return None if row is None else _position(row)


def subscription_reset(conn: Connection, name: str, to: str) -> int | None:
    """The subscription's new position; None if there is no such subscription."""
    row = conn.execute(QUERIES["subscription_reset"], {"name": name, "to": to}).fetchone()
    return None if row is None else _position(row)


def subscription_drop(conn: Connection, name: str) -> bool:
    """Whether there was such a subscription."""
    return conn.execute(QUERIES["subscription_drop"], {"name": name}).fetchone() is not None


def subscriptions_list(conn: Connection, name: str | None, *, count_limit: int) -> list[SubscriptionInfo]:
    with conn.cursor(row_factory=class_row(SubscriptionInfo)) as cur:
        return cur.execute(QUERIES["subscriptions_list"], {"name": name, "count_limit": count_limit}).fetchall()


def subscription_failures_list(conn: Connection, name: str) -> list[SubscriptionFailure]:
    with conn.cursor(row_factory=class_row(SubscriptionFailure)) as cur:
        return cur.execute(QUERIES["subscription_failures_list"], {"name": name}).fetchall()


def subscription_unpark(conn: Connection, name: str, transition_id: int | None) -> list[int]:
    """Give parked transitions back to the consumer (all, or one); the ids given back."""
    rows = conn.execute(QUERIES["subscription_unpark"], {"name": name, "transition_id": transition_id})
    return [given for (given,) in rows]


def transitions_list(conn: Connection, *, after: int, job_id: uuid.UUID | None, limit: int) -> list[Transition]:
    with conn.cursor(row_factory=class_row(Transition)) as cur:
        return cur.execute(QUERIES["transitions_list"], {"after": after, "job_id": job_id, "limit": limit}).fetchall()


def transitions_listen(conn: Connection) -> None:
    """Be notified (``conn.notifies()``) when transitions are written."""
    conn.execute(QUERIES["transitions_listen"])


def job_transitions_recent(conn: Connection, job_id: uuid.UUID, limit: int) -> list[Transition]:
    """The job's ``limit`` newest transitions, newest first."""
    with conn.cursor(row_factory=class_row(Transition)) as cur:
        return cur.execute(QUERIES["job_transitions_recent"], {"job_id": job_id, "limit": limit}).fetchall()


def _position(row: tuple[Any, ...]) -> int:
    (position,) = row
    return int(position)
