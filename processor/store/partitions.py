"""Partitions and the advisory locks that share them out among the workers.

Every advisory lock class the product takes is defined here, together, with what each key means: a
newcomer reading a ``pg_locks`` row finds its owner in one place. Each class is a fixed constant so
that every worker of every version agrees on it, chosen to be unlikely to collide with the
application's own advisory locks (two-key form: ``pg_locks.classid`` is the class, ``objid`` the key).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from psycopg.rows import class_row, scalar_row

from outbox.sqlfile import load_queries
from outbox.subscription import SUBSCRIBER_LOCK_CLASS as SUBSCRIBER_LOCK_CLASS
from processor.snapshot import Snapshot
from processor.store._connection import Connection

QUERIES = load_queries("processor.store", "partitions.sql")

# ----- The advisory lock classes (0x0B0C5E11 to 0x0B0C5E14)

# One active consumer per partition: a session lock, key = the partition, held by the connection that
# writes the partition's batches (processor/worker.py); it goes when that session ends. Two
# transaction-level keys below 0 serialise what must not run while partitions move:
CONSUMER_LOCK_CLASS = 0x0B0C_5E11
MIGRATIONS_LOCK_KEY = -1  # one `outbox migrate` at a time (processor/migrate.py, query migrations_lock)
REPARTITION_LOCK_KEY = -2  # one `outbox repartition` at a time (processor/repartition.py)
# Orders the job transitions each transaction appends (SQL function outbox_transitions_lock(), written
# out as 185359889, -3 in schema/schema.sql and migration 0012: the schema cannot import this constant).
TRANSITIONS_LOCK_KEY = -3

# Membership: every live worker session holds key 0 in shared mode; the holders are counted for the
# fair share of the partitions (ceil(partitions / members)).
MEMBER_LOCK_CLASS = CONSUMER_LOCK_CLASS + 1

# CONSUMER_LOCK_CLASS + 2, SUBSCRIBER_LOCK_CLASS (imported above): one active consumer per subscription
# (outbox/subscription.py, key = a hash of the name). Defined in the application's package, which must not
# import the processor; named here so that this list is whole (tests/unit/test_lock_classes.py).

# Cluster-wide periodic work done by one elected worker (processor/election.py): a session lock whose
# key is the duty (ClusterDuty); whoever holds it does that duty until its session ends.
ELECTION_LOCK_CLASS = CONSUMER_LOCK_CLASS + 3


class ClusterDuty(IntEnum):
    """Periodic work for the whole cluster, done by one worker: the key of its lock in ELECTION_LOCK_CLASS."""

    METRICS_SCAN = 0  # the gauges that scan pending work (processor/metrics.py), on the refresh connection
    THROUGHPUT_PRUNE = 1  # dropping outbox_throughput's counts older than a day, on a worker's session
    RETENTION = 2  # OUTBOX_RETENTION's rounds (processor/retention.py), on a connection of their own


# ----- Consumers and members


@dataclass(frozen=True, slots=True)
class LockHolder:
    pid: int
    application_name: str
    since: dt.datetime


@dataclass(frozen=True, slots=True)
class PartitionHolder:
    partition: int
    pid: int
    application_name: str
    since: dt.datetime


def consumer_lock_try(conn: Connection, partition: int) -> bool:
    """Try to become the partition's consumer (a session lock; it stacks if taken twice)."""
    return bool(_scalar(conn, "consumer_lock_try", {"lock_class": CONSUMER_LOCK_CLASS, "partition": partition}))


def consumer_lock_release(conn: Connection, partition: int) -> None:
    conn.execute(QUERIES["consumer_lock_release"], {"lock_class": CONSUMER_LOCK_CLASS, "partition": partition})


def consumer_lock_holder(conn: Connection, partition: int) -> LockHolder | None:
    params = {"lock_class": CONSUMER_LOCK_CLASS, "partition": partition}
    return conn.cursor(row_factory=class_row(LockHolder)).execute(QUERIES["consumer_lock_holder"], params).fetchone()


def consumer_lock_holders(conn: Connection) -> dict[int, LockHolder]:
    """Each partition's consumer, if it has one."""
    cur = conn.cursor(row_factory=class_row(PartitionHolder))
    rows = cur.execute(QUERIES["consumer_locks_holders"], {"lock_class": CONSUMER_LOCK_CLASS}).fetchall()
    return {r.partition: LockHolder(pid=r.pid, application_name=r.application_name, since=r.since) for r in rows}


def members_join(conn: Connection) -> None:
    """Count this session among the live workers until it ends."""
    conn.execute(QUERIES["members_join"], {"lock_class": MEMBER_LOCK_CLASS})


def members_count(conn: Connection) -> int:
    return int(_scalar(conn, "members_count", {"lock_class": MEMBER_LOCK_CLASS}))


def election_lock_try(conn: Connection, duty: ClusterDuty) -> bool:
    """Try to become the worker that does ``duty`` (a session lock: try once per session, it stacks)."""
    return bool(_scalar(conn, "election_lock_try", {"lock_class": ELECTION_LOCK_CLASS, "duty": int(duty)}))


def partitions_get(conn: Connection) -> int:
    """The partition count (outbox_partitioning)."""
    return int(_scalar(conn, "partitions_get"))


# ----- The rebase after a restore into another cluster (processor/rebase.py)


@dataclass(frozen=True, slots=True)
class ClusterCheck:
    """Where a partition's checkpoint comes from (a checkpoint with no cluster yet is claimed for this one)."""

    checkpoint_cluster: int | None
    this_cluster: int
    rebase_pending: bool


def cluster_check(conn: Connection, partition: int) -> ClusterCheck:
    cur = conn.cursor(row_factory=class_row(ClusterCheck))
    row = cur.execute(QUERIES["cluster_check"], {"partition": partition}).fetchone()
    assert row is not None
    return row


def snapshot_current(conn: Connection) -> Snapshot:
    """This cluster's snapshot now (its xmax: the next transaction id)."""
    return Snapshot.parse(_scalar(conn, "snapshot_current"))


def rebase_lock_events(conn: Connection) -> None:
    """Hold the writers (EXCLUSIVE on outbox_events) for the rest of the transaction, with no statement timeout."""
    conn.execute(QUERIES["rebase_lock_events"])


def rebase_anchor(conn: Connection, partition: int) -> int:
    """Re-mark the other cluster's events as applied and anchor the checkpoint here (rebase pending); how many."""
    marked = conn.execute(QUERIES["rebase_events_from_another_cluster"]).rowcount
    conn.execute(QUERIES["rebase_checkpoint"], {"partition": partition})
    return marked


def rebase_done(conn: Connection, partition: int) -> None:
    conn.execute(QUERIES["rebase_done"], {"partition": partition})


# ----- `outbox repartition` (processor/repartition.py)


def transaction_lock_timeout(conn: Connection, lock_timeout: str) -> None:
    conn.execute(QUERIES["transaction_lock_timeout"], {"lock_timeout": lock_timeout})


def transaction_statement_timeout(conn: Connection, statement_timeout: str) -> None:
    conn.execute(QUERIES["transaction_statement_timeout"], {"statement_timeout": statement_timeout})


def repartition_serialise(conn: Connection) -> None:
    """Wait for any other repartition to end (a transaction lock)."""
    conn.execute(QUERIES["repartition_serialise"], {"lock_class": CONSUMER_LOCK_CLASS, "key": REPARTITION_LOCK_KEY})


def repartition_hold_writers(conn: Connection) -> None:
    conn.execute(QUERIES["repartition_hold_writers"])


def repartition_catch_ups_count(conn: Connection) -> int:
    """Partitions with a catch-up in progress (a target snapshot)."""
    return int(_scalar(conn, "repartition_catch_ups_count"))


def repartition_switch(conn: Connection, partitions: int) -> int:
    """Set the new count, move applied events, dead letters and queued jobs, restart every checkpoint; events moved."""
    conn.execute(QUERIES["repartition_set"], {"partitions": partitions})
    moved = conn.execute(QUERIES["repartition_relabel_events"]).rowcount
    conn.execute(QUERIES["repartition_relabel_dead_letters"])
    conn.execute(QUERIES["repartition_relabel_jobs_awaiting_fold"])
    conn.execute(QUERIES["repartition_checkpoints"], {"partitions": partitions})
    return moved


# ----- Wake-up by NOTIFY (OUTBOX_WAKEUP=notify; processor/wakeup.py, schema/migrations/0003_notify_wakeup.sql)


def wakeup_listen(conn: Connection) -> None:
    conn.execute(QUERIES["wakeup_listen"])


def wakeup_trigger_enabled(conn: Connection) -> bool:
    return bool(_scalar(conn, "wakeup_trigger_enabled"))


def wakeup_trigger_set(conn: Connection, *, enabled: bool) -> None:
    """Create (or drop) the statement trigger by which writers of jobs_variants notify the worker."""
    conn.execute(QUERIES["wakeup_enable" if enabled else "wakeup_disable"])


def _scalar(conn: Connection, query: str, params: dict[str, Any] | None = None) -> Any:
    """The one value of a query's one row."""
    value = conn.cursor(row_factory=scalar_row).execute(QUERIES[query], params).fetchone()
    assert value is not None, query
    return value
