"""Job state has one writer: the processor. Anything else that writes jobs.status or
jobs.current_step is refused at once (never undone silently by the next fold); a hold is how the
application sets a job's state itself. Every legacy form of the aggregation trigger is found."""

from __future__ import annotations

import psycopg
import pytest

import outbox
from processor import schema_check
from tests.acceptance.test_adoption import LEGACY_FORMS
from tests.helpers import drain, job_state
from tests.reference import reference_job_states

STEPS = ("ingest", "detect", "segment", "iou_eval")


def test_an_application_write_of_job_state_is_refused_with_the_supported_way(conn, engine, settings):
    with engine.begin() as sa:
        job, _ = outbox.create_job(sa, variants=1)
    drain(settings)
    with pytest.raises(psycopg.errors.RestrictViolation) as refused:
        conn.execute("UPDATE jobs SET status = 'failed' WHERE job_id = %s", [job])  # a support "cancel"
    assert "written by the outbox processor" in str(refused.value)
    assert "outbox_hold_job" in (refused.value.diag.message_hint or "")
    # Other columns stay the application's, and so does inserting a job.
    conn.execute("UPDATE jobs SET updated_at = now() WHERE job_id = %s", [job])
    assert job_state(conn, job) == ("queued", "ingest")


def test_a_held_job_is_left_alone_until_released_then_folded_again(conn, engine, settings):
    with engine.begin() as sa:
        job, (v1, v2) = outbox.create_job(sa, variants=2)
        outbox.update_variant(sa, v1, status="running", step="detect")
    drain(settings)
    with engine.begin() as sa:
        outbox.hold_job(sa, job, status="failed", step="detect", reason="cancelled by support (ticket 42)")
    assert job_state(conn, job) == ("failed", "detect")
    with engine.begin() as sa:  # the pipeline goes on writing its variants
        outbox.update_variant(sa, v1, status="done", step="iou_eval")
        outbox.update_variant(sa, v2, status="running", step="segment")
    drain(settings)
    assert job_state(conn, job) == ("failed", "detect")  # honoured, not undone
    with engine.begin() as sa:
        assert outbox.release_job(sa, job) is True
        assert outbox.release_job(sa, job) is False  # not held any more
    drain(settings)
    assert job_state(conn, job) == reference_job_states(conn, STEPS)[job] == ("running", "segment")


def test_a_hold_refuses_a_bad_status_and_an_unknown_job(engine):
    import uuid

    with pytest.raises(ValueError), engine.begin() as sa:
        outbox.hold_job(sa, uuid.uuid4(), status="cancelled", reason="no such status")
    with pytest.raises(Exception, match="no job with id"), engine.begin() as sa:
        outbox.hold_job(sa, uuid.uuid4(), status="failed", reason="no such job")


@pytest.mark.parametrize("form", list(LEGACY_FORMS))
def test_every_form_of_the_legacy_trigger_is_found_and_its_writes_are_refused(form, conn, engine):
    conn.execute(
        "CREATE FUNCTION legacy_helper_touch_job(p_job uuid) RETURNS void LANGUAGE plpgsql AS $$ "
        "BEGIN UPDATE jobs SET status = 'running' WHERE job_id = p_job; END $$"
    )
    body = LEGACY_FORMS[form].replace("user_id, ", "").replace("0, 'running'", "'running'")
    conn.execute(
        f"CREATE FUNCTION legacy() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} RETURN NULL; END $$;"
        "CREATE TRIGGER legacy AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION legacy()"
    )
    (found,) = schema_check.legacy_triggers(conn)
    assert found.trigger == "legacy"
    with engine.begin() as sa:
        _, (variant,) = outbox.create_job(sa, variants=1)
    with pytest.raises(Exception, match="written by the outbox processor"), engine.begin() as sa:
        outbox.update_variant(sa, variant, status="done", step="iou_eval")


def test_triggers_that_do_not_write_jobs_are_not_taken_for_legacy_ones(conn):
    conn.execute(
        "CREATE TABLE audit (id uuid, at timestamptz);"
        "CREATE FUNCTION audit_variant() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "  -- it does not UPDATE jobs, it only mentions them\n"
        "  INSERT INTO audit VALUES (NEW.job_id, now());"
        "  EXECUTE format('UPDATE %I SET at = now()', 'audit');"
        "  RETURN NULL; END $$;"
        "CREATE TRIGGER audit_variant AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION audit_variant()"
    )
    assert schema_check.legacy_triggers(conn) == []
