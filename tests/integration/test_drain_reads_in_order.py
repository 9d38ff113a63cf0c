"""A batch reads the events after its cursor from the segments' position index, in order, and no more.

With the outbox in segments (migration 0015), the planner may read the range by merging each
segment's index scan, or by reading every event after the cursor and sorting them to keep the first
few. It takes the sort when it believes few events follow the cursor, which is what its statistics
say when the cursor is inside one large transaction (and always, for a transaction of the done
snapshot's xip list): each batch of a catch-up then read and sorted the whole remaining backlog (a
1M-event drain at 0.75 of its rate, each batch dearer the longer the backlog). The checks are on
what the statement reads, counted by the server for the current transaction
(pg_stat_get_xact_tuples_returned), and on the plan it ran (auto_explain), not on time. The
settings that keep it so are the batch transaction's, and are given back after the statement.
"""

from __future__ import annotations

import psycopg
import pytest

from processor import store
from processor.batch import apply_batch
from processor.database import connect
from processor.snapshot import Cursor, Snapshot
from tests.helpers import JOBS_OF_TEN_VARIANTS, fold_context

LIMIT = 100  # of the 20,000 events of JOBS_OF_TEN_VARIANTS, in one transaction


def _outbox_rows_read(conn) -> int:
    """Rows the current transaction read from the outbox's segments, by any path: the entries of
    every index (position, primary key, variant_id; bitmap scans included) and the rows of
    sequential scans."""
    row = conn.execute(
        "SELECT coalesce(sum(pg_stat_get_xact_tuples_returned(t.relid)), 0)::bigint"
        "     + coalesce(sum((SELECT sum(pg_stat_get_xact_tuples_returned(i.indexrelid))"
        "                     FROM pg_index AS i WHERE i.indrelid = t.relid)), 0)::bigint"
        " FROM pg_partition_tree('outbox_events') AS t"
        " WHERE t.isleaf"
    ).fetchone()
    return int(row[0])


def _read_by_the_next_batch(wconn, cursor: Cursor) -> tuple[store.AppliedEvents, int]:
    """The batch after ``cursor``, and the outbox rows it read; rolled back (only what it read matters)."""
    with wconn.transaction():
        before = _outbox_rows_read(wconn)
        applied = store.events_apply(wconn, 0, cursor, LIMIT)
        read = _outbox_rows_read(wconn) - before
        raise psycopg.Rollback
    return applied, read


def test_a_batch_inside_a_large_transaction_reads_only_its_own_events(db, conn, settings):
    # One transaction appends 20,000 events; the statistics then know it (as after autovacuum's
    # ANALYZE): its txid is the highest there is.
    with conn.transaction():
        conn.execute(JOBS_OF_TEN_VARIANTS)
    conn.execute("ANALYZE outbox_events")
    ctx = fold_context(settings)
    with connect(db, application_name="outbox-tests") as wconn:
        cursor = store.checkpoint_get(wconn, 0).cursor
        first = apply_batch(wconn, ctx, expected=cursor, limit=LIMIT)
        assert first.events == LIMIT and not first.complete
        # The next batch starts inside that transaction: the planner's "few events left".
        applied, read = _read_by_the_next_batch(wconn, first.cursor)
    assert applied.count == LIMIT
    assert applied.event_ids == sorted(applied.event_ids) and applied.event_ids[0] > max(first.event_ids)
    # Its own events and a few more (each segment's scan reads one past what it returns), not
    # the 19,900 that follow the cursor.
    assert read <= 2 * LIMIT, f"the batch read {read} outbox rows for {LIMIT} events"


def test_a_batch_inside_a_transaction_of_the_done_snapshots_xip_list_reads_only_its_own_events(db, conn):
    # The done snapshot was taken while the large transaction ran: its events are read by the
    # statement's other half, one index read per such transaction, after the last one applied.
    with conn.transaction():
        txid = int(conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0])
        conn.execute(JOBS_OF_TEN_VARIANTS)
    conn.execute("ANALYZE outbox_events")
    done = Snapshot.parse(f"{txid}:{txid + 1}:{txid}")
    with connect(db, application_name="outbox-tests") as wconn:
        first, _ = _read_by_the_next_batch(wconn, Cursor(done=done))
        assert first.count == LIMIT and first.last is not None and first.last.txid == txid
        applied, read = _read_by_the_next_batch(wconn, Cursor(done=done).partway_to(first.target, first.last))
    assert applied.count == LIMIT
    assert applied.event_ids == sorted(applied.event_ids) and applied.event_ids[0] > max(first.event_ids)
    assert read <= 2 * LIMIT, f"the batch read {read} outbox rows for {LIMIT} events"


def test_the_batch_statement_is_not_compiled_and_its_settings_are_given_back(db, conn):
    # With jit_above_cost at 0 every statement that JIT may compile is compiled: events_apply must
    # not be (compiling it took about 0.9 s a batch). auto_explain reports the plan it ran.
    if not conn.execute("SELECT pg_jit_available()").fetchone()[0]:
        pytest.skip("this server has no JIT provider (llvmjit): nothing to check")
    with conn.transaction():
        conn.execute(JOBS_OF_TEN_VARIANTS)
    with connect(db, application_name="outbox-tests") as wconn:
        try:
            wconn.execute("LOAD 'auto_explain'")
        except psycopg.Error as error:
            pytest.skip(f"auto_explain cannot be loaded here: {error}")
        plans: list[str] = []
        wconn.add_notice_handler(lambda diag: plans.append(diag.message_primary or ""))
        for statement in (
            "SET auto_explain.log_min_duration = 0",
            "SET auto_explain.log_level = notice",
            "SET auto_explain.log_nested_statements = on",
            "SET jit_above_cost = 0",
            "SET jit = on",
            # A session's own value, other than the configured one: SET LOCAL ... TO DEFAULT
            # would not give it back.
            "SET enable_sort = off",
        ):
            wconn.execute(statement)
        with wconn.transaction():
            cursor = store.checkpoint_get(wconn, 0).cursor
            plans.clear()
            applied = store.events_apply(wconn, 0, cursor, LIMIT)
            after = wconn.execute("SELECT current_setting('enable_sort'), current_setting('jit')").fetchone()
            raise psycopg.Rollback
    assert applied.count == LIMIT
    # The statement's plan, and those of the statements it runs (the merge into the variant states).
    batch_plans = [plan for plan in plans if "outbox_events" in plan or "outbox_variant_states" in plan]
    assert any("Merge Append" in plan for plan in batch_plans), f"no plan of the batch statement was reported: {plans}"
    assert not any("JIT:" in plan for plan in batch_plans), "events_apply was compiled by JIT"
    # Given back for the rest of the batch's transaction: as they were, not as configured.
    assert after == ("off", "on")


def test_events_apply_outside_a_transaction_is_refused(db):
    # Its settings are transaction-local: outside a transaction block they would silently not apply.
    with (
        connect(db, application_name="outbox-tests") as wconn,
        pytest.raises(RuntimeError, match="inside the batch's transaction"),
    ):
        store.events_apply(wconn, 0, store.checkpoint_get(wconn, 0).cursor, LIMIT)
