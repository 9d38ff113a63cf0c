"""`outbox repartition N`: change the partition count of a live system, safely.

An event's partition is a hash of its job id modulo the count, so a new count routes a job's
events elsewhere. Done while events are pending, a job's events could be applied by two workers,
out of order. So, in one transaction:

1. hold the writers back (SHARE lock on outbox_events: INSERTs wait, the workers keep reading) and
   wait for the transactions that already wrote events to end;
2. wait until the workers have applied every event and folded every job (the outbox is drained);
3. lock every checkpoint row, in partition order (as the operations do: none of them, nor any
   worker's batch, runs from here on), and check again that nothing is pending: an operation that
   committed in between may have queued jobs; if so, let go of the checkpoints and wait again;
4. write the new count into ``outbox_partition_of``, move applied events and dead letters to their
   new partitions, and start every partition's checkpoint from this transaction's snapshot.

``timeout`` bounds the whole, counted from the moment writers start to queue behind the lock
request: if the outbox is not drained and switched by then, the transaction rolls back, nothing
changes, and the writers go on. Workers notice the new count at their next rebalance; a worker
whose OUTBOX_PARTITIONS no longer matches stops with a clear error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from outbox.limits import PARTITIONS_MAX
from processor import store
from processor.errors import ConfigurationError, NotDrainedError
from processor.store import Connection

MAX_PARTITIONS = PARTITIONS_MAX  # outbox.limits, as the CHECK on outbox_partitioning


@dataclass(frozen=True)
class RepartitionReport:
    before: int
    after: int
    events_moved: int = 0
    writers_held_seconds: float = 0.0


@dataclass(frozen=True)
class Pending:
    events: int
    catch_ups: int
    jobs_awaiting_fold: int

    @property
    def drained(self) -> bool:
        return self.events == 0 and self.catch_ups == 0 and self.jobs_awaiting_fold == 0

    def __str__(self) -> str:
        return (
            f"{self.events} events to apply, {self.catch_ups} catch-ups in progress,"
            f" {self.jobs_awaiting_fold} jobs to fold"
        )


def pending(conn: Connection) -> Pending:
    """Every partition's pending work (store.events_pending_summary) and the catch-ups still open."""
    summary = store.events_pending_summary(conn, None, top=0)
    return Pending(summary.count, store.repartition_catch_ups_count(conn), summary.jobs_awaiting_fold)


def repartition(
    conn: Connection,
    partitions: int,
    *,
    timeout: float = 60.0,
    on_wait: Callable[[Pending], None] | None = None,
) -> RepartitionReport:
    """Change the partition count to ``partitions`` (see the module's docstring)."""
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ConfigurationError(f"the partition count must be between 1 and {MAX_PARTITIONS} (got {partitions})")
    before = store.partitions_get(conn)
    if before == partitions:
        return RepartitionReport(before, partitions)
    held = time.monotonic()  # writers queue behind the lock from its request on
    deadline = _Deadline(held + timeout, timeout)
    try:
        with conn.transaction():
            _hold_writers(conn, deadline)
            _wait_until_drained(conn, deadline, on_wait)
            # The switch is bounded too: writers wait for it.
            store.transaction_statement_timeout(conn, deadline.remaining_ms())
            moved = store.repartition_switch(conn, partitions)
    except psycopg.errors.QueryCanceled:
        raise NotDrainedError(
            f"the switch did not finish within {timeout:g} s (relabelling the applied events; `outbox prune` "
            "makes it shorter, or give a longer --timeout); nothing was changed"
        ) from None
    except psycopg.errors.DeadlockDetected:
        # Every product path takes the outbox's lock before the checkpoints', as this does; an
        # application transaction may not. PostgreSQL chose this transaction to roll back.
        raise NotDrainedError(
            "a deadlock with another transaction stopped it; nothing was changed, run it again"
        ) from None
    return RepartitionReport(before, partitions, moved, time.monotonic() - held)


@dataclass(frozen=True)
class _Deadline:
    at: float  # monotonic
    timeout: float  # as given, for the messages

    def remaining_ms(self) -> str:
        return f"{max(1, int((self.at - time.monotonic()) * 1000))}ms"


def _hold_writers(conn: Connection, deadline: _Deadline) -> None:
    """One repartition at a time, then the writers held back (SHARE on outbox_events), both within the deadline."""
    store.transaction_lock_timeout(conn, deadline.remaining_ms())
    try:
        store.repartition_serialise(conn)
        store.transaction_lock_timeout(conn, deadline.remaining_ms())
        store.repartition_hold_writers(conn)
    except psycopg.errors.LockNotAvailable:
        raise NotDrainedError(
            f"could not hold the writers back within {deadline.timeout:g} s (a long transaction wrote events, or "
            "another repartition runs?); nothing was changed"
        ) from None


def _wait_until_drained(conn: Connection, deadline: _Deadline, on_wait: Callable[[Pending], None] | None) -> None:
    """Until the workers applied and folded everything and every checkpoint is locked (else NotDrainedError)."""
    while True:
        state = pending(conn)
        if state.drained and _lock_checkpoints_if_drained(conn, deadline.remaining_ms()):
            return
        if on_wait is not None:
            on_wait(state)
        if time.monotonic() >= deadline.at:
            raise NotDrainedError(
                f"the outbox did not drain within {deadline.timeout:g} s ({state}); are the workers running? "
                "Nothing was changed"
            )
        time.sleep(0.05)  # polling the workers' progress, not synchronisation


def _lock_checkpoints_if_drained(conn: Connection, lock_timeout: str) -> bool:
    """Lock every checkpoint row and confirm nothing is pending; else let go of them (a savepoint)."""
    try:
        with conn.transaction():
            store.transaction_lock_timeout(conn, lock_timeout)
            store.checkpoints_lock_all(conn)
            if pending(conn).drained:
                return True
            raise psycopg.Rollback()
    except psycopg.errors.LockNotAvailable:
        return False
    return False
