"""Subscriptions as an operator manages them: create, list (with lag), reset, drop, failures, retry."""

from __future__ import annotations

import uuid

from outbox.limits import VARIANT_STATUSES
from outbox.subscription import Transition, check_name
from processor import store
from processor.errors import SubscriptionError
from processor.store import Connection, SubscriptionFailure, SubscriptionInfo

STATUSES = VARIANT_STATUSES  # outbox.limits
LAG_COUNT_LIMIT = 1_000_000  # lag is counted up to this (an index range); more reads as "at least"


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
    position = store.subscription_create(conn, name, from_start=from_start, to_statuses=to_statuses)
    if position is None:
        raise SubscriptionError(f"subscription {name!r} exists already (`outbox subscriptions reset` moves it)")
    return position


def list_subscriptions(conn: Connection, name: str | None = None) -> list[SubscriptionInfo]:
    return store.subscriptions_list(conn, name, count_limit=LAG_COUNT_LIMIT)


def reset(conn: Connection, name: str, to: str) -> int:
    name = checked_name(name)
    if to not in ("start", "now") and not (to.isdigit() and int(to) < 2**63):
        raise SubscriptionError(f"--to must be start, now or a transition id (got {to!r})")
    position = store.subscription_reset(conn, name, to)
    if position is None:
        raise _unknown(name)
    return position


def drop(conn: Connection, name: str) -> None:
    name = checked_name(name)
    if not store.subscription_drop(conn, name):
        raise _unknown(name)


def failures(conn: Connection, name: str) -> list[SubscriptionFailure]:
    name = _existing(conn, name)
    return store.subscription_failures_list(conn, name)


def retry(conn: Connection, name: str, transition_id: int | None) -> list[int]:
    """Give parked transitions back to the consumer (all of them, or one); the ids given back."""
    name = _existing(conn, name)
    return store.subscription_unpark(conn, name, transition_id)


def transitions(conn: Connection, *, after: int, job_id: uuid.UUID | None, limit: int) -> list[Transition]:
    return store.transitions_list(conn, after=after, job_id=job_id, limit=limit)


def checked_name(name: str) -> str:
    try:
        return check_name(name)
    except ValueError as exc:
        raise SubscriptionError(str(exc)) from None


def _existing(conn: Connection, name: str) -> str:
    name = checked_name(name)
    if not list_subscriptions(conn, name):
        raise _unknown(name)
    return name


def _unknown(name: str) -> SubscriptionError:
    return SubscriptionError(f"no subscription named {name!r} (`outbox subscriptions list`)")
