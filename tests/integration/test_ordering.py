"""Commit-safe order: late commits are never skipped, and a variant's changes apply in its own order."""

from __future__ import annotations

import threading
import uuid

import outbox
from processor.database import connect
from tests.fix_database import make_settings
from tests.helpers import drain, job_state, wait_for, waiting_on_lock

SET = "UPDATE jobs_variants SET status = %s, current_step = %s WHERE job_variants_id = %s"


def test_an_event_committed_after_later_events_were_processed_is_still_applied(db, settings, engine):
    with engine.begin() as conn:
        late_job, (late_variant,) = outbox.create_job(conn, variants=1)
        early_job, (early_variant,) = outbox.create_job(conn, variants=1)
    drain(settings)

    with (
        connect(db, application_name="late", autocommit=False) as late,
        connect(db, application_name="early", autocommit=False) as early,
        connect(db, application_name="observer") as observer,
    ):
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
        assert job_state(observer, early_job) == ("done", "iou_eval")
        assert job_state(observer, late_job) == ("queued", "ingest")

        late.commit()
        drain(settings)
        assert job_state(observer, late_job) == ("done", "iou_eval")


def test_a_variants_changes_apply_in_version_order_whatever_the_commit_order_of_ids(db, settings, engine):
    """B takes its xid first, then waits for A's row lock: B's event sorts before A's, yet is newer."""
    with engine.begin() as conn:
        job, (variant,) = outbox.create_job(conn, variants=1)
    drain(settings)
    with (
        connect(db, application_name="a", autocommit=False) as a,
        connect(db, application_name="b", autocommit=False) as b,
        connect(db, application_name="observer") as observer,
    ):
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
        # In (txid, event_id) order B's "done" comes before A's "running", yet carries the newer version.
        assert [status for _, status in rows] == ["queued", "done", "running"]
        assert rows[1][0] > rows[2][0] > rows[0][0]

        drain(settings)
        assert job_state(observer, job) == ("done", "iou_eval")


def test_an_open_unrelated_transaction_does_not_hold_processing_back(db, settings, engine):
    with engine.begin() as conn:
        job, (variant,) = outbox.create_job(conn, variants=1)
    with (
        connect(db, application_name="idle-in-tx", autocommit=False) as blocker,
        connect(db, application_name="observer") as observer,
    ):
        blocker.execute("SELECT pg_current_xact_id()")  # an old transaction id, still running
        with engine.begin() as conn:
            outbox.update_variant(conn, variant, status="done", step="iou_eval")
        drain(settings)  # returns although the old transaction is still open
        assert job_state(observer, job) == ("done", "iou_eval")
        blocker.rollback()


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


def test_no_job_ever_shows_a_state_that_no_committed_snapshot_had(db, engine):
    """A takes its xid first; B adds a queued variant and commits; then A finishes the last variant.

    In (txid, event_id) order A's event comes first, and alone it would make the job done; but
    when A committed, B's queued variant already existed. Even one event per batch, the job must
    never be written done.
    """
    settings = make_settings(db, batch_size=1)
    with engine.begin() as conn:
        job, (v1, v2) = outbox.create_job(conn, variants=2)
        outbox.update_variant(conn, v1, status="done", step="iou_eval")
        outbox.update_variant(conn, v2, status="running", step="iou_eval")
    drain(settings)
    with connect(db, application_name="observer") as observer:
        observer.execute(
            "CREATE TABLE job_log (status text, current_step text);"
            "CREATE FUNCTION log_job() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "INSERT INTO job_log VALUES (NEW.status, NEW.current_step); RETURN NEW; END $$;"
            "CREATE TRIGGER log_job AFTER UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION log_job();"
        )
        with connect(db, application_name="a", autocommit=False) as a:
            a.execute("SELECT pg_current_xact_id()")
            with engine.begin() as b:
                b.exec_driver_sql(
                    "INSERT INTO jobs_variants (job_variants_id, job_id, status) VALUES (%(v)s, %(j)s, 'queued')",
                    {"v": uuid.uuid4(), "j": job},
                )
            a.execute(SET, ["done", "iou_eval", v2])
            a.commit()
        drain(settings)
        assert job_state(observer, job) == ("running", "ingest")
        assert ("done", "iou_eval") not in observer.execute("SELECT status, current_step FROM job_log").fetchall()
