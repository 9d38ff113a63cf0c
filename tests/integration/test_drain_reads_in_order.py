"""A batch reads the events after its cursor from the segments' position index, in order, and no more.

With the outbox in segments (migration 0015), the planner may read the range by merging each
segment's index scan, or by reading every event after the cursor and sorting them to keep the first
few. It takes the sort when it believes few events follow the cursor, which is what its statistics
say when the cursor is inside one large transaction: each batch of a catch-up then read and sorted
the whole remaining backlog (a 1M-event drain at 0.75 of its rate, each batch dearer the longer the
backlog). The check is on what the statement reads, counted by the server for the current
transaction (pg_stat_get_xact_tuples_returned), not on time.
"""

from __future__ import annotations

import psycopg

from processor import store
from processor.batch import apply_batch
from processor.database import connect
from tests.helpers import fold_context

JOBS = 2_000  # 10 variants each: 20,000 events in one transaction
LIMIT = 100


def _index_entries_returned(conn) -> int:
    """Index entries the current transaction read from every segment's position index."""
    row = conn.execute(
        "SELECT coalesce(sum(pg_stat_get_xact_tuples_returned(i.indexrelid)), 0)::bigint"
        " FROM pg_partition_tree('outbox_events') AS t"
        " JOIN pg_index AS i ON i.indrelid = t.relid"
        " WHERE t.isleaf AND pg_get_indexdef(i.indexrelid) LIKE '%(partition, txid, event_id)'"
    ).fetchone()
    return int(row[0])


def test_a_batch_inside_a_large_transaction_reads_only_its_own_events(db, conn, settings):
    # One transaction appends 20,000 events; the statistics then know it (as after autovacuum's
    # ANALYZE): its txid is the highest there is.
    conn.execute(
        "INSERT INTO jobs (job_id, status) SELECT gen_random_uuid(), 'queued' FROM generate_series(1, %s)", [JOBS]
    )
    conn.execute(
        "INSERT INTO jobs_variants (job_variants_id, job_id, status)"
        " SELECT gen_random_uuid(), job_id, 'queued' FROM jobs, generate_series(1, 10)"
    )
    conn.execute("ANALYZE outbox_events")
    ctx = fold_context(settings)
    with connect(db, application_name="outbox-tests") as wconn:
        cursor = store.checkpoint_get(wconn, 0).cursor
        first = apply_batch(wconn, ctx, expected=cursor, limit=LIMIT)
        assert first.events == LIMIT and not first.complete
        # The next batch starts inside that transaction: the planner's "few events left".
        with wconn.transaction():
            before = _index_entries_returned(wconn)
            applied = store.events_apply(wconn, 0, first.cursor, LIMIT)
            read = _index_entries_returned(wconn) - before
            raise psycopg.Rollback  # what it applied goes: only what it read is of interest
        assert applied.count == LIMIT
        assert applied.event_ids == sorted(applied.event_ids) and applied.event_ids[0] > max(first.event_ids)
        # Its own events and a few more (each segment's scan reads one past what it returns), not
        # the 19,900 that follow the cursor.
        assert read <= 2 * LIMIT, f"the batch read {read} index entries for {LIMIT} events"
