"""The schema's bookkeeping: applied migrations, the oldest worker a database serves, and the fold
configuration that `outbox migrate` sets and `outbox pipeline set` changes."""

from __future__ import annotations

import time
from dataclasses import dataclass

from psycopg.rows import class_row, scalar_row

from outbox.sqlfile import load_queries
from processor.store._connection import Connection
from processor.store.partitions import CONSUMER_LOCK_CLASS, MIGRATIONS_LOCK_KEY

QUERIES = load_queries("processor.store", "migrations.sql")


@dataclass(frozen=True, slots=True)
class SchemaState:
    """The database's schema version, and the oldest worker version it still serves."""

    version: int
    serves_workers_from: int


@dataclass(frozen=True, slots=True)
class FoldConfigRow:
    pipeline_steps: list[str] | None  # None until `outbox migrate` sets it
    failure_policy: str
    version: int


@dataclass(frozen=True, slots=True)
class FoldConfigWritten:
    version: int | None  # None: nothing changed
    jobs_queued: int


@dataclass(frozen=True, slots=True)
class StepUse:
    step: str
    variants: int


def migrations_lock(conn: Connection) -> None:
    """One migrate at a time (transaction-level, released at commit)."""
    conn.execute(QUERIES["migrations_lock"], {"lock_class": CONSUMER_LOCK_CLASS, "key": MIGRATIONS_LOCK_KEY})


def migrations_session_lock(conn: Connection, *, poll: float = 0.2) -> None:
    """The same lock as migrations_lock, for the session: a migration's prepare steps run in several
    transactions, and two migrates must not interleave them.

    Tried every ``poll`` seconds rather than waited for: a statement waiting for it would keep its
    snapshot, and the other migrate's CREATE INDEX CONCURRENTLY waits for every older snapshot to
    go (a deadlock)."""
    params = {"lock_class": CONSUMER_LOCK_CLASS, "key": MIGRATIONS_LOCK_KEY}
    with conn.cursor(row_factory=scalar_row) as cur:
        while not cur.execute(QUERIES["migrations_session_lock_try"], params).fetchone():
            time.sleep(poll)


def migrations_session_unlock(conn: Connection) -> None:
    conn.execute(QUERIES["migrations_session_unlock"], {"lock_class": CONSUMER_LOCK_CLASS, "key": MIGRATIONS_LOCK_KEY})


def migrations_table_create(conn: Connection) -> None:
    conn.execute(QUERIES["migrations_table_create"])


def migrations_table_exists(conn: Connection) -> bool:
    return bool(conn.cursor(row_factory=scalar_row).execute(QUERIES["migrations_table_exists"]).fetchone())


def migrations_applied(conn: Connection) -> set[int]:
    return {int(v) for v in conn.cursor(row_factory=scalar_row).execute(QUERIES["migrations_applied"])}


def migrations_state(conn: Connection) -> SchemaState:
    """The schema version (0: none applied) and the oldest worker version it serves."""
    row = conn.cursor(row_factory=class_row(SchemaState)).execute(QUERIES["migrations_state"]).fetchone()
    assert row is not None
    return row


def migration_apply(conn: Connection, text: str) -> None:
    """Run a migration's statements (several at once: no parameters)."""
    conn.execute(text.encode())


def prepare_wanted(conn: Connection, query: str) -> bool:
    """A migration's "-- when:" query (no parameters): whether its prepare steps are to run."""
    with conn.cursor(row_factory=scalar_row) as cur:
        return bool(cur.execute(query.encode()).fetchone())


def lock_timeout_set(conn: Connection, timeout: str) -> None:
    """For the session: a statement that waits longer than ``timeout`` for a lock fails."""
    conn.execute(QUERIES["lock_timeout_set"], {"timeout": timeout})


def lock_timeout_reset(conn: Connection) -> None:
    conn.execute(QUERIES["lock_timeout_reset"])


def migration_record(conn: Connection, version: int, name: str, serves_workers_from: int | None) -> None:
    """Record a migration as applied; from 0014 on, with the oldest worker version it serves."""
    conn.execute(QUERIES["migration_record"], {"version": version, "name": name})
    if serves_workers_from is not None:
        conn.execute(
            QUERIES["migration_serves_record"], {"version": version, "serves_workers_from": serves_workers_from}
        )


def fold_config_get(conn: Connection) -> FoldConfigRow | None:
    return conn.cursor(row_factory=class_row(FoldConfigRow)).execute(QUERIES["fold_config_get"]).fetchone()


def fold_config_set(conn: Connection, steps: list[str], policy: str, *, refold: bool) -> FoldConfigWritten:
    """Write the configuration (the caller holds every checkpoint's lock); with ``refold``, queue every job."""
    cursor = conn.cursor(row_factory=class_row(FoldConfigWritten))
    row = cursor.execute(QUERIES["fold_config_set"], {"steps": steps, "policy": policy, "refold": refold}).fetchone()
    assert row is not None
    return row


def variant_steps_used(conn: Connection) -> list[StepUse]:
    """The steps jobs_variants uses, with how many variants each, most used first."""
    return conn.cursor(row_factory=class_row(StepUse)).execute(QUERIES["variant_steps_used"]).fetchall()
