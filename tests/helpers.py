"""Small helpers shared by integration and acceptance tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg

from processor.settings import Settings
from processor.worker import Worker, WorkerStats


def drain(settings: Settings) -> WorkerStats:
    """Run a worker until nothing more can be processed right now."""
    return Worker(settings, settings.database()).run(until_idle=True)


def wait_for(condition: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds.

    For waiting on another process (a worker subprocess) to reach a state, never to order a race.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def job_state(conn: psycopg.Connection[Any], job_id: Any) -> tuple[str, str]:
    row = conn.execute("SELECT status, current_step FROM jobs WHERE job_id = %s", [job_id]).fetchone()
    assert row is not None
    return (row[0], row[1])


def waiting_on_lock(conn: psycopg.Connection[Any], pid: int) -> bool:
    row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return bool(row and row[0] == "Lock")
