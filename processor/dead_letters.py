"""`outbox dead-letters`: list, retry and discard events that could not be applied.

Retry and discard change what the variant's state is built from, so both end by rebuilding the
event's variant and job from the outbox (processor.replay.rebuild_jobs), in one transaction that
holds every checkpoint: the same rule as everywhere decides the variant's newest state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from processor import store
from processor.decode import decode_event
from processor.replay import rebuild_jobs
from processor.store import QUERIES, Connection


def list_dead_letters(conn: Connection, *, include_discarded: bool = False, limit: int = 1000) -> list[dict[str, Any]]:
    rows = conn.execute(QUERIES["dead_letters_list"], {"include_discarded": include_discarded, "limit": limit})
    return [
        {
            "event_id": r[0], "partition": r[1], "job_id": _s(r[2]), "variant_id": _s(r[3]), "reason": r[4],
            "parked_at": r[5].isoformat(), "discarded_at": r[6].isoformat() if r[6] else None,
            "event_type": r[7], "schema_version": r[8], "written_at": r[9].isoformat() if r[9] else None,
            "holds_job": r[10],
        }
        for r in rows
    ]  # fmt: skip


def retry(conn: Connection, event_ids: Sequence[int]) -> dict[int, str]:
    """Decode each dead letter's event again (the payload or the worker may have been fixed) and apply it.

    Returns, per event, "applied" or the reason it still cannot be applied (kept parked).
    """
    outcomes: dict[int, str] = {}
    for event_id in event_ids:
        with conn.transaction():
            store.checkpoints_lock_all(conn)  # the workers wait for us
            row = conn.execute(QUERIES["dead_letter_event_get"], {"event_id": event_id}).fetchone()
            if row is None or row[10] is not None:
                outcomes[event_id] = "not a dead letter waiting for retry (unknown, discarded or pruned)"
                continue
            (event,) = store.event_rows([row])
            decoded = decode_event(event)
            if decoded.dead_letter is not None:
                conn.execute(
                    QUERIES["dead_letter_update_reason"],
                    {
                        "event_id": event_id,
                        "reason": decoded.dead_letter.reason,
                        "holds_job": decoded.dead_letter.holds_job,
                    },
                )
                outcomes[event_id] = f"still failing: {decoded.dead_letter.reason}"
                continue
            conn.execute(QUERIES["dead_letter_delete"], {"event_id": event_id})
            assert event.job_id is not None and event.variant_id is not None
            rebuild_jobs(conn, [event.job_id], variant_ids=[event.variant_id], dry_run=False)
            outcomes[event_id] = "applied"
    return outcomes


def discard(conn: Connection, event_ids: Sequence[int]) -> dict[int, str]:
    """Ignore these events from now on: mark them, and rebuild their jobs without them.

    Discarding again rebuilds again (idempotent).
    """
    outcomes: dict[int, str] = {}
    for event_id in event_ids:
        with conn.transaction():
            store.checkpoints_lock_all(conn)
            row = conn.execute(QUERIES["dead_letter_discard"], {"event_id": event_id}).fetchone()
            if row is None:
                outcomes[event_id] = "not a dead letter (unknown event id)"
                continue
            job_id, variant_id = row
            if job_id is not None:
                rebuild_jobs(conn, [job_id], variant_ids=[variant_id] if variant_id else [], dry_run=False)
            outcomes[event_id] = "discarded"
    return outcomes


def _s(value: object) -> str | None:
    return None if value is None else str(value)


def partitions_of(conn: Connection, event_ids: Sequence[int]) -> dict[int, int]:
    """The partition of each of these dead letters (ids that are none are left out)."""
    rows = conn.execute(QUERIES["dead_letters_partitions"], {"event_ids": list(event_ids)}).fetchall()
    return {row[0]: row[1] for row in rows}
