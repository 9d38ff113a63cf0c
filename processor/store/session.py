"""The worker's session settings, and transactions that read one snapshot; SQL in session.sql."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.rows import scalar_row

from outbox.sqlfile import load_queries
from processor.store._connection import Connection

QUERIES = load_queries("processor.store", "session.sql")


def session_configure(conn: Connection, *, statement_timeout: float, session_timeout: float) -> None:
    conn.execute(
        QUERIES["session_configure"],
        {
            "statement_timeout": f"{int(statement_timeout * 1000)}ms",
            "session_timeout": f"{int(session_timeout * 1000)}ms",
        },
    )


def backend_pid(conn: Connection) -> int:
    """The server process this session really runs in (behind a proxy it may differ from libpq's)."""
    pid = conn.cursor(row_factory=scalar_row).execute(QUERIES["backend_pid"]).fetchone()
    assert pid is not None
    return int(pid)


@contextmanager
def one_snapshot(conn: Connection) -> Iterator[None]:
    """Run what is inside in one REPEATABLE READ, read-only transaction: one consistent view.

    Inside a transaction the caller opened, it adds nothing (the caller chose how to read).
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        yield
        return
    with conn.transaction():
        conn.execute(QUERIES["transaction_snapshot"])
        yield
