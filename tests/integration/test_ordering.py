"""Commit-safe order: late commits are never skipped, and a variant's changes apply in its own order."""

from __future__ import annotations

import threading
import uuid

import outbox
from processor import store
from processor.database import connect
from tests.helpers import drain, job_state, wait_for, waiting_on_lock

SET = "UPDATE jobs_variants SET status = %s, current_step = %s WHERE job_variants_id = %s"


def test_an_event_committed_after_later_events_were_processed_is_still_applied(db, settings, engine):
    with engine.begin() as conn:
        late_job, (late_variant,) = outbox.create_job(conn, variants=1)
        early_job, (early_variant,) = outbox.create_job(conn, variants=1)
    drain(settings)

    with connect(db, application_name="late", autocommit=False) as late, connect(
        db, application_name="early", autocommit=False
    ) as early, connect(db, application_name="observer") as observer:
        # "early" takes its transaction id first, "late" second ...
        early.execute("SELECT pg_current_xact_id()")
        late.execute("SELECT pg_current_xact_id()")
        # ... but "late" writes its event first: it gets the lower event id.
        late.execute(SET, ["done", "iou_eval", late_variant])
        early.execute(SET, ["done", "iou_eval", early_variant])
        early.commit()
        last_event = "SELECT max(event_id) FROM outbox_events WHERE variant_id = %s"
        (late_event,) = late.execute(last_event, [late_variant]).fetchone()  # its own, uncommitted
        (early_event,) = observer.execute(last_event, [early_variant]).fetchone()
        assert late_event < early_event  # by id, the late commit comes first

        drain(settings)
        # The event with the higher id was processed while the lower one was not yet committed.
        position = store.checkpoint_get(observer, 0).position
        assert position.event_id == early_event
        assert job_state(observer, early_job) == ("done", "iou_eval")

        late.commit()
        drain(settings)
        assert job_state(observer, late_job) == ("done", "iou_eval")


def test_a_variants_changes_apply_in_version_order_whatever_the_commit_order_of_ids(db, settings, engine):
    """B takes its xid first, then waits for A's row lock: B's event sorts before A's, yet is newer."""
    with engine.begin() as conn:
        job, (variant,) = outbox.create_job(conn, variants=1)
    drain(settings)
    with connect(db, application_name="a", autocommit=False) as a, connect(
        db, application_name="b", autocommit=False
    ) as b, connect(db, application_name="observer") as observer:
        b.execute("SELECT pg_current_xact_id()")
        a.execute(SET, ["running", "segment", variant])
        errors: list[BaseException] = []

        def b_writes() -> None:
            try:
                b.execute(SET, ["done", "iou_eval", variant])
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=b_writes)
        thread.start()
        wait_for(lambda: waiting_on_lock(observer, b.info.backend_pid), what="B waiting for A's row lock")
        a.commit()
        thread.join()
        b.commit()
        assert not errors
        rows = observer.execute(
            "SELECT variant_version, payload->>'status' FROM outbox_events WHERE variant_id = %s "
            "ORDER BY txid, event_id",
            [variant],
        ).fetchall()
        assert rows == [(1, "queued"), (3, "done"), (2, "running")]  # processing order != version order

        drain(settings)
        assert job_state(observer, job) == ("done", "iou_eval")


def test_until_idle_exits_while_an_unrelated_transaction_is_open(db, settings, engine):
    with engine.begin() as conn:
        job, (variant,) = outbox.create_job(conn, variants=1)
    with connect(db, application_name="idle-in-tx", autocommit=False) as blocker:
        blocker.execute("SELECT pg_current_xact_id()")  # holds the snapshot xmin back
        with engine.begin() as conn:
            outbox.update_variant(conn, variant, status="done", step="iou_eval")
        drain(settings)  # returns: nothing more can be processed right now
        blocker.rollback()
    drain(settings)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT status FROM jobs WHERE job_id = %(j)s", {"j": job}).scalar() == "done"


def test_duplicate_and_replayed_events_have_no_further_effect(db, settings, engine, conn):
    with engine.begin() as sa:
        job, (v1, v2) = outbox.create_job(sa, variants=2)
        outbox.update_variant(sa, v1, status="done", step="iou_eval")
        outbox.update_variant(sa, v2, status="done", step="iou_eval")
        outbox.update_variant(sa, v2, status="running", step="segment")
    drain(settings)
    assert job_state(conn, job) == ("running", "segment")
    # Deliver the older "done" event again, as a redelivery would.
    conn.execute(
        "INSERT INTO outbox_events (event_type, schema_version, job_id, variant_id, variant_version, payload) "
        "SELECT event_type, schema_version, job_id, variant_id, variant_version, payload FROM outbox_events "
        "WHERE variant_id = %s AND payload->>'status' = 'done'",
        [v2],
    )
    stats = drain(settings)
    assert stats.events == 1
    assert job_state(conn, job) == ("running", "segment")
