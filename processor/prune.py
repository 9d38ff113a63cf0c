"""`outbox prune`: remove applied events older than a duration, keeping replay correct.

Job transitions older than the duration go too, once every subscription acknowledged them.

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
from processor.errors import ConfigurationError
from processor.store import Connection

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


@dataclass(frozen=True, slots=True)
class PruneResult:
    events_deleted: int
    baseline_updates: int


def prune(
    conn: Connection,
    partition: int,
    older_than: dt.timedelta,
    *,
    chunk_size: int = 5000,
    on_chunk: Callable[[int], None] | None = None,
) -> PruneResult:
    """Delete applied events of ``partition`` written more than ``older_than`` ago, in short transactions.

    Each round locks the partition's checkpoint (its worker waits; applied means visible in its done
    snapshot), folds the round's events into the baseline (store.prune_chunk) and deletes them.
    """
    cutoff = store.cutoff_get(conn, older_than)
    deleted = baselines = 0
    while True:
        with conn.transaction():
            # The outbox's lock before the checkpoint's, in the order `outbox repartition` takes them
            # (it holds the writers back with a SHARE lock, then locks the checkpoints): no deadlock.
            store.events_lock_for_prune(conn)
            locked = store.checkpoint_lock(conn, partition)  # the worker waits for us
            pruned = store.prune_chunk(conn, partition, cutoff=cutoff, done=locked.cursor.done, limit=chunk_size)
        if not pruned.events_deleted:
            break
        deleted += pruned.events_deleted
        baselines += pruned.baseline_updates
        if on_chunk is not None:
            on_chunk(pruned.events_deleted)
    store.throughput_prune(conn)
    return PruneResult(deleted, baselines)


def prune_transitions(
    conn: Connection, older_than: dt.timedelta, *, chunk_size: int = 5000, on_chunk: Callable[[int], None] | None = None
) -> int:
    """Delete job transitions older than ``older_than`` that no subscription still needs, in short transactions."""
    cutoff = store.cutoff_get(conn, older_than)
    deleted = 0
    while True:
        with conn.transaction():
            n = store.transitions_prune(conn, cutoff=cutoff, limit=chunk_size)
        if n <= 0:
            return deleted
        deleted += n
        if on_chunk is not None:
            on_chunk(n)
