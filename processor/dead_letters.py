"""`outbox dead-letters`: list, retry and discard events that could not be applied.

Retry and discard change what the variant's state is built from, so both end by rebuilding the
event's variant and job from the outbox (processor.replay.rebuild_jobs), in one transaction that
holds every checkpoint: the same rule as everywhere decides the variant's newest state.
"""

from __future__ import annotations

from collections.abc import Sequence

from processor import store
from processor.decode import decode_event
from processor.replay import rebuild_jobs
from processor.store import Connection, DeadLetterRecord

APPLIED = "applied"
DISCARDED = "discarded"


def list_dead_letters(
    conn: Connection, *, include_discarded: bool = False, limit: int = 1000
) -> list[DeadLetterRecord]:
    return store.dead_letters_list(conn, include_discarded=include_discarded, limit=limit)


def retry(conn: Connection, event_ids: Sequence[int]) -> dict[int, str]:
    """Decode each dead letter's event again (the payload or the worker may have been fixed) and apply it.

    Returns, per event, "applied" or the reason it still cannot be applied (kept parked).
    """
    outcomes: dict[int, str] = {}
    for event_id in event_ids:
        with conn.transaction():
            store.checkpoints_lock_all(conn)  # the workers wait for us
            outcomes[event_id] = _retry_one(conn, event_id)
    return outcomes


def _retry_one(conn: Connection, event_id: int) -> str:
    letter = store.dead_letter_event_get(conn, event_id)
    if letter is None or letter.discarded_at is not None:
        return "not a dead letter waiting for retry (unknown, discarded or pruned)"
    event = letter.event_row()
    decoded = decode_event(event)
    if decoded.dead_letter is not None:
        store.dead_letter_reason_update(
            conn, event_id, reason=decoded.dead_letter.reason, holds_job=decoded.dead_letter.holds_job
        )
        return f"still failing: {decoded.dead_letter.reason}"
    store.dead_letter_delete(conn, event_id)
    assert event.job_id is not None and event.variant_id is not None
    rebuild_jobs(conn, [event.job_id], variant_ids=[event.variant_id], dry_run=False)
    return APPLIED


def discard(conn: Connection, event_ids: Sequence[int]) -> dict[int, str]:
    """Ignore these events from now on: mark them, and rebuild their jobs without them.

    Discarding again rebuilds again (idempotent).
    """
    outcomes: dict[int, str] = {}
    for event_id in event_ids:
        with conn.transaction():
            store.checkpoints_lock_all(conn)
            discarded = store.dead_letter_discard(conn, event_id)
            if discarded is None:
                outcomes[event_id] = "not a dead letter (unknown event id)"
                continue
            if discarded.job_id is not None:
                variants = [discarded.variant_id] if discarded.variant_id else []
                rebuild_jobs(conn, [discarded.job_id], variant_ids=variants, dry_run=False)
            outcomes[event_id] = DISCARDED
    return outcomes


def partitions_of(conn: Connection, event_ids: Sequence[int]) -> dict[int, int]:
    """The partition of each of these dead letters (ids that are none are left out)."""
    return store.dead_letters_partitions(conn, event_ids)
