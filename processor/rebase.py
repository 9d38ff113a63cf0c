"""Resume after a restore into another cluster, where transaction ids start over.

The checkpoint stores PostgreSQL snapshots, which are only meaningful in the cluster that took
them. After ``pg_dump``/``pg_restore`` into a new cluster, the stored snapshot is "from the future"
(its xmax beyond this cluster's counter): new events would look applied and be skipped. The worker
detects that at start-up and rebases before processing anything:

1. in one transaction, holding the checkpoint row and an EXCLUSIVE lock on outbox_events (writers
   wait; the events present are all committed), events carrying the old cluster's transaction ids
   are given txid 1 (visible in any snapshot) and the checkpoint is set to this transaction's
   snapshot: every event present counts as covered;
2. then every job is rebuilt by replay from all those events (latest by variant version, and
   versions come from a sequence that pg_dump carries over), so the events that were pending when
   the dump was taken, and any written since the restore, take effect.

Replay is idempotent, so a crash between 1 and 2 is mended by rebuilding again: the worker does
it whenever it finds jobs flagged for rebase (outbox_dirty_jobs with every job).
"""

from __future__ import annotations

import logging

from processor import store
from processor.batch import FoldContext
from processor.replay import replay
from processor.snapshot import Cursor, Snapshot
from processor.store import QUERIES, Connection

log = logging.getLogger(__name__)


def from_another_cluster(conn: Connection, cursor: Cursor) -> bool:
    """Whether the checkpoint's snapshots were taken in a cluster ahead of this one."""
    row = conn.execute(QUERIES["snapshot_current"]).fetchone()
    assert row is not None
    now = Snapshot.parse(row[0])
    newest = max(cursor.done.xmax, cursor.target.xmax if cursor.target else 0)
    return newest > now.xmax


def rebase(conn: Connection, ctx: FoldContext) -> int:
    """Re-anchor the checkpoint in this cluster and rebuild every job; return the events re-marked."""
    with conn.transaction():
        store.checkpoint_lock(conn, ctx.partition)
        conn.execute(QUERIES["rebase_lock_events"])
        marked = conn.execute(QUERIES["rebase_events_from_another_cluster"]).rowcount
        conn.execute(QUERIES["rebase_checkpoint"], {"partition": ctx.partition})
    log.warning(
        "the checkpoint came from another cluster (restored database): %s events re-marked; rebuilding all jobs",
        marked,
    )
    jobs = store.job_ids_all(conn, ctx.partition)
    replay(conn, ctx, jobs, dry_run=False)
    log.warning("rebase done: %s jobs rebuilt", len(jobs))
    return marked
