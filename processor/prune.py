"""`outbox prune`: remove applied events older than a duration, keeping replay correct.

Before events are deleted, the state they give each variant is folded into
outbox_variant_baseline, where replay starts. Only events that are applied (visible in the
checkpoint's done snapshot) are removed, never a dead letter still waiting for retry or discard.
The writers' hot path stays append-only: only this command deletes.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass

from processor import store
from processor.batch import FoldContext
from processor.decode import decode_event
from processor.errors import ConfigurationError
from processor.fold import VariantState
from processor.store import QUERIES, Connection

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> dt.timedelta:
    """'90s', '30m', '12h', '7d', '2w'."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigurationError(f"duration {text!r} is not a number followed by s, m, h, d or w (e.g. 7d)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds > 100 * 365 * 86400:
        raise ConfigurationError(f"duration {text!r} is longer than 100 years")
    return dt.timedelta(seconds=seconds)


@dataclass
class PruneResult:
    events_deleted: int = 0
    baseline_updates: int = 0


def prune(
    conn: Connection,
    ctx: FoldContext,
    older_than: dt.timedelta,
    *,
    chunk_size: int = 5000,
    on_chunk: Callable[[int], None] | None = None,
) -> PruneResult:
    """Delete applied events written more than ``older_than`` ago, in short transactions."""
    result = PruneResult()
    row = conn.execute(QUERIES["clock_minus"], {"interval": older_than}).fetchone()
    assert row is not None
    cutoff = row[0]
    while True:
        with conn.transaction():
            cursor = store.checkpoint_lock(conn, ctx.partition)  # the worker waits for us
            rows = conn.execute(
                QUERIES["prune_doomed"],
                {"partition": ctx.partition, "cutoff": cutoff, "done": str(cursor.done), "limit": chunk_size},
            ).fetchall()
            if not rows:
                break
            baseline: list[tuple[VariantState, int]] = []
            for event, newest in zip(store.event_rows(rows), (r[9] for r in rows), strict=True):
                state = decode_event(event).state if newest else None
                if state is not None:
                    baseline.append((state, event.event_id))
            store.variant_baseline_upsert(conn, baseline)
            ids = [r[0] for r in rows]
            conn.execute(QUERIES["dead_letters_delete_pruned"], {"event_ids": ids})
            conn.execute(QUERIES["events_delete"], {"event_ids": ids})
        result.events_deleted += len(ids)
        result.baseline_updates += len(baseline)
        if on_chunk is not None:
            on_chunk(len(ids))
    conn.execute(QUERIES["throughput_prune"])
    return result
