"""A handler for `outbox subscribe --handler tests.acceptance.transition_handlers:record`."""

from __future__ import annotations

from typing import Any


def record(conn: Any, transition: Any) -> None:
    conn.execute("INSERT INTO handled VALUES (%s, %s)", [transition.transition_id, transition.to_status])
