"""`outbox repartition N`: change the partition count of a live system, safely.

An event's partition is a hash of its job id modulo the count, so a new count routes a job's
events elsewhere. Done while events are pending, a job's events could be applied by two workers,
out of order. So, in one transaction:

1. hold the writers back (SHARE lock on outbox_events: INSERTs wait, the workers keep reading) and
   wait for the transactions that already wrote events to end;
2. wait until the workers have applied every event and folded every job (the outbox is drained),
   or give up after ``timeout`` and change nothing;
3. write the new count into ``outbox_partition_of``, move applied events and dead letters to their
   new partitions, and start every partition's checkpoint from this transaction's snapshot.

Writers wait for at most ``timeout`` plus the time of step 3. Workers notice the new count at their
next rebalance; a worker whose OUTBOX_PARTITIONS no longer matches stops with a clear error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from processor import store
from processor.errors import ConfigurationError, OutboxError
from processor.store import QUERIES, Connection

MAX_PARTITIONS = 1024  # as the CHECK on outbox_partitioning


class NotDrainedError(OutboxError):
    """The outbox did not drain in time; nothing was changed."""


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
    jobs_to_fold: int

    @property
    def drained(self) -> bool:
        return self.events == 0 and self.catch_ups == 0 and self.jobs_to_fold == 0

    def __str__(self) -> str:
        return (
            f"{self.events} events to apply, {self.catch_ups} catch-ups in progress, {self.jobs_to_fold} jobs to fold"
        )


def pending(conn: Connection) -> Pending:
    events = catch_ups = jobs = 0
    for partition, catching_up, dirty in conn.execute(QUERIES["repartition_pending"]).fetchall():
        cursor = store.checkpoint_get(conn, partition).cursor
        events += store.events_pending_summary(conn, partition, cursor, top=0).count
        catch_ups += bool(catching_up)
        jobs += dirty
    return Pending(events, catch_ups, jobs)


def repartition(
    conn: Connection,
    partitions: int,
    *,
    timeout: float = 60.0,
    lock_timeout: float = 10.0,
    on_wait: Callable[[Pending], None] | None = None,
) -> RepartitionReport:
    """Change the partition count to ``partitions`` (see the module's docstring)."""
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ConfigurationError(f"the partition count must be between 1 and {MAX_PARTITIONS} (got {partitions})")
    before = store.partitions_get(conn)
    if before == partitions:
        return RepartitionReport(before, partitions)
    with conn.transaction():
        conn.execute(QUERIES["transaction_lock_timeout"], {"lock_timeout": f"{int(lock_timeout * 1000)}ms"})
        try:
            conn.execute(QUERIES["repartition_hold_writers"])
        except psycopg.errors.LockNotAvailable:
            raise NotDrainedError(
                f"could not hold the writers back within {lock_timeout:g} s (a long transaction wrote events?); "
                "nothing was changed"
            ) from None
        held = time.monotonic()
        deadline = held + timeout
        while not (state := pending(conn)).drained:
            if on_wait is not None:
                on_wait(state)
            if time.monotonic() >= deadline:
                raise NotDrainedError(
                    f"the outbox did not drain within {timeout:g} s ({state}); are the workers running? "
                    "Nothing was changed"
                )
            time.sleep(0.1)  # polling the workers' progress, not synchronisation
        conn.execute(QUERIES["repartition_set"], {"partitions": partitions})
        moved = conn.execute(QUERIES["repartition_relabel_events"]).rowcount
        conn.execute(QUERIES["repartition_relabel_dead_letters"])
        conn.execute(QUERIES["repartition_checkpoints"], {"partitions": partitions})
    return RepartitionReport(before, partitions, moved, time.monotonic() - held)
