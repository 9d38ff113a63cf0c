"""Resume after a restore into another cluster, where transaction ids start over.

The checkpoint stores PostgreSQL snapshots, which only mean something in the cluster that took
them. After ``pg_dump``/``pg_restore`` into another cluster, new events could look applied and be
skipped. The worker detects that at start-up (the checkpoint's cluster_id, from
``pg_control_system()``, differs from this cluster's, or its snapshot is from the future) and
rebases before processing anything:

1. in one transaction, holding the checkpoint row and an EXCLUSIVE lock on outbox_events (writers
   wait; the events present are all committed), events carrying the old cluster's transaction ids
   are given txid 1 (visible in any snapshot), the checkpoint is anchored in this cluster, and
   ``rebase_pending`` is set: every event present now counts as covered;
2. every job is rebuilt by replay from all those events (latest by variant version; versions come
   from a sequence that pg_dump carries over), so the events that were pending when the dump was
   taken, and any written since the restore, take effect; then ``rebase_pending`` is cleared.

A crash between or during the two leaves ``rebase_pending`` set, and the next start rebuilds again
(replay is idempotent).
"""

from __future__ import annotations

import logging
from enum import Enum

from processor import store
from processor.batch import FoldContext
from processor.replay import replay
from processor.snapshot import Cursor
from processor.store import Connection

log = logging.getLogger(__name__)


class Need(Enum):
    """What a partition's checkpoint needs before its events can be read (``check``)."""

    NOTHING = "nothing: the checkpoint is this cluster's"
    REBASE = "a rebase: the checkpoint comes from another cluster (a restored database)"
    REBUILD = "a rebuild: a rebase was interrupted"


def check(conn: Connection, partition: int, cursor: Cursor) -> Need:
    """Whether the partition's checkpoint comes from another cluster, or a rebuild is still pending."""
    cluster = store.cluster_check(conn, partition)
    now = store.snapshot_current(conn)
    newest = cursor.xmax
    if cluster.checkpoint_cluster != cluster.this_cluster or newest > now.xmax:
        return Need.REBASE
    return Need.REBUILD if cluster.rebase_pending else Need.NOTHING


def run(conn: Connection, ctx: FoldContext, need: Need) -> None:
    """Do what ``check`` found the partition needs (a rebase, or the rest of an interrupted one)."""
    if need is Need.REBASE:
        rebase(conn, ctx)  # restored into another cluster: transaction ids started over
    elif need is Need.REBUILD:
        rebuild(conn, ctx)  # an interrupted rebase


def rebase(conn: Connection, ctx: FoldContext) -> None:
    """Anchor the checkpoint in this cluster, then rebuild every job."""
    with conn.transaction():
        # The outbox's lock first, then the checkpoint's: the order `outbox repartition` and prune take them.
        store.rebase_lock_events(conn)
        store.checkpoint_lock(conn, ctx.partition)
        marked = store.rebase_anchor(conn, ctx.partition)
    log.warning("the checkpoint came from another cluster (a restored database): %s events re-marked", marked)
    rebuild(conn, ctx)


def rebuild(conn: Connection, ctx: FoldContext) -> None:
    """Rebuild every job by replay, then clear the pending mark (also resumes an interrupted rebase)."""
    jobs = store.job_ids_all(conn, ctx.partition)
    log.warning("rebuilding %s jobs after a rebase", len(jobs))
    replay(conn, jobs, dry_run=False)
    store.rebase_done(conn, ctx.partition)
    log.warning("rebase done")
