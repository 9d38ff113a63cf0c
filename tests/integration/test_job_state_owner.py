"""Job state has one writer: the processor. Anything else that writes jobs.status or
jobs.current_step is refused at once (never undone silently by the next fold); a hold is how the
application sets a job's state itself. Every legacy form of the aggregation trigger is found."""

from __future__ import annotations

import psycopg
import pytest

import outbox
from processor import schema_check
from tests.acceptance.test_adoption import LEGACY_FORMS
from tests.helpers import drain, job_state, wait_for
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


# Written for a review of the detection: what must be found, and what must be left alone (migrate
# drops what is found).
WRITERS_OF_JOB_STATE = """
CREATE FUNCTION fn1_helper(p uuid) RETURNS void LANGUAGE sql
BEGIN ATOMIC UPDATE jobs SET status = 'done' WHERE job_id = p; END;
CREATE FUNCTION fn1() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM fn1_helper(NEW.job_id); RETURN NEW; END $$;
CREATE TRIGGER fn1_trg AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION fn1();
CREATE FUNCTION "RecalcJob"(p uuid) RETURNS void LANGUAGE plpgsql AS $$
BEGIN UPDATE jobs SET status = 'done' WHERE job_id = p; END $$;
CREATE FUNCTION fn2() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM "RecalcJob"(NEW.job_id); RETURN NEW; END $$;
CREATE TRIGGER fn2_trg AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION fn2();
CREATE FUNCTION fn3_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE format('UPDATE %I SET status = $1 WHERE job_id = $2', TG_ARGV[0]) USING NEW.status, NEW.job_id;
  RETURN NEW;
END $$;
CREATE TRIGGER fn3_trg AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION fn3_rollup('jobs');
CREATE VIEW job_state AS SELECT job_id, status, current_step FROM jobs;
CREATE FUNCTION fn4() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN UPDATE job_state SET status = 'done' WHERE job_id = NEW.job_id; RETURN NEW; END $$;
CREATE TRIGGER fn4_trg AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION fn4();
CREATE FUNCTION fn5() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE DEBUG 'rollup -- %', NEW.job_id; UPDATE jobs SET status = 'done' WHERE job_id = NEW.job_id;
  RETURN NEW;
END $$;
CREATE TRIGGER fn5_trg AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION fn5();
CREATE FUNCTION fn6() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  WITH done AS (SELECT NEW.job_id AS id) UPDATE public."jobs" AS j SET (status, current_step) = ('done', 'iou_eval')
  FROM done WHERE j.job_id = done.id;
  RETURN NEW;
END $$;
CREATE TRIGGER fn6_trg AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION fn6();
"""

NOT_WRITERS_OF_JOB_STATE = """
CREATE SCHEMA reporting; CREATE TABLE reporting.jobs (job_id uuid, n int);
ALTER TABLE jobs ADD COLUMN variant_count integer DEFAULT 0;
CREATE FUNCTION fp1_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN UPDATE jobs SET updated_at = now() WHERE job_id = NEW.job_id; RETURN NEW; END $$;
CREATE TRIGGER fp1_touch_parent AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION fp1_touch();
CREATE FUNCTION fp2_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN UPDATE jobs SET variant_count = variant_count + 1 WHERE job_id = NEW.job_id; RETURN NEW; END $$;
CREATE TRIGGER fp2_count_variants AFTER INSERT ON jobs_variants FOR EACH ROW EXECUTE FUNCTION fp2_count();
CREATE FUNCTION fp3_parent() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO jobs (job_id, status) VALUES (NEW.job_id, 'queued') ON CONFLICT DO NOTHING; RETURN NEW; END $$;
CREATE TRIGGER fp3_create_parent BEFORE INSERT ON jobs_variants FOR EACH ROW EXECUTE FUNCTION fp3_parent();
CREATE FUNCTION fp4_report() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO reporting.jobs VALUES (NEW.job_id, 1); RETURN NEW; END $$;
CREATE TRIGGER fp4_reporting AFTER INSERT ON jobs_variants FOR EACH ROW EXECUTE FUNCTION fp4_report();
CREATE FUNCTION fp5_check() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF NEW.status NOT IN ('queued','running','done','failed') THEN
    RAISE EXCEPTION 'invalid status; to update jobs set status = ... with the support tool';
  END IF;
  RETURN NEW; END $$;
CREATE TRIGGER fp5_validate BEFORE UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION fp5_check();
CREATE SCHEMA legacy;
CREATE FUNCTION legacy.log_change(p uuid) RETURNS void LANGUAGE plpgsql AS $$
BEGIN UPDATE jobs SET status = 'done' WHERE job_id = p; END $$;
CREATE TABLE change_log (job_id uuid, at timestamptz);
CREATE FUNCTION public.log_change(p uuid) RETURNS void LANGUAGE sql AS $$ INSERT INTO change_log VALUES (p, now()) $$;
CREATE FUNCTION fp6() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM public.log_change(NEW.job_id); RETURN NEW; END $$;
CREATE TRIGGER fp6_log AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION fp6();
CREATE FUNCTION fp7() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  EXECUTE format('INSERT INTO change_log VALUES ($1, now())') USING NEW.job_id;
  PERFORM pg_notify('jobs', NEW.job_id::text);
  RETURN NEW; END $$;
CREATE TRIGGER fp7_notify AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION fp7();
"""


def test_detection_finds_every_writer_of_job_state_and_leaves_the_other_triggers(conn):
    conn.execute(WRITERS_OF_JOB_STATE + NOT_WRITERS_OF_JOB_STATE)
    found = {t.trigger: t.how for t in schema_check.legacy_triggers(conn)}
    assert sorted(found) == [f"fn{i}_trg" for i in range(1, 7)], found
    assert "fn1_helper" in found["fn1_trg"] and "RecalcJob" in found["fn2_trg"]
    assert "dynamic SQL" in found["fn3_trg"] and "job_state" in found["fn4_trg"]


# Regressions of a review of the guard, the casts and holds.


def test_an_application_before_trigger_on_jobs_cannot_change_job_state_behind_the_guard(conn, engine, settings):
    # Triggers fire in name order: this one fires after any BEFORE guard would have, and changes
    # status on a write that names neither column. The guard sees the row as it is written.
    conn.execute(
        "ALTER TABLE jobs ADD COLUMN cancelled boolean NOT NULL DEFAULT false;"
        "CREATE FUNCTION z_cancel() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN IF NEW.cancelled THEN NEW.status := 'failed'; END IF; RETURN NEW; END $$;"
        "CREATE TRIGGER z_cancel BEFORE UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION z_cancel()"
    )
    with engine.begin() as sa:
        job, (variant,) = outbox.create_job(sa, variants=1)
    drain(settings)
    with pytest.raises(psycopg.errors.RestrictViolation):
        conn.execute("UPDATE jobs SET cancelled = true WHERE job_id = %s", [job])
    assert job_state(conn, job) == ("queued", "ingest")
    with engine.begin() as sa:  # the processor's own writes pass, whatever the other triggers are
        outbox.update_variant(sa, variant, status="running", step="detect")
    drain(settings)
    assert job_state(conn, job) == ("running", "detect")


def test_the_columns_types_can_change_after_migrate_and_a_cast_that_no_longer_fits_is_reported(conn, engine, settings):
    from processor.migrate import migrate

    # Widening a varchar: nothing of the product's depends on the columns' types.
    conn.execute("ALTER TABLE jobs ALTER current_step TYPE varchar(12)")
    conn.execute("ALTER TABLE jobs ALTER current_step TYPE varchar(40)")
    assert schema_check.problems(conn) == []
    # To an enum: the cast function written for text no longer fits; it is reported until migrate.
    conn.execute(
        "CREATE TYPE job_status AS ENUM ('queued', 'running', 'done', 'failed');"
        "ALTER TABLE jobs ALTER status TYPE job_status USING status::job_status"
    )
    (problem,) = schema_check.problems(conn)
    assert "jobs.status is job_status" in problem and "outbox migrate" in problem
    migrate(conn)
    assert schema_check.problems(conn) == []
    with engine.begin() as sa:
        job, (variant,) = outbox.create_job(sa, variants=1)
        outbox.update_variant(sa, variant, status="done", step="iou_eval")
    drain(settings)
    assert job_state(conn, job) == ("done", "iou_eval")


def test_held_jobs_are_listed_by_verify_and_left_out_of_drift_and_replay(conn, engine, settings):
    from processor.replay import rebuild_jobs
    from processor.verify import verify

    with engine.begin() as sa:
        job, (variant,) = outbox.create_job(sa, variants=1)
        outbox.update_variant(sa, variant, status="done", step="iou_eval")
    drain(settings)
    with engine.begin() as sa:
        outbox.hold_job(sa, job, status="failed", reason="cancelled by support")
    report = verify(conn)
    assert report.ok and not report.stuck_jobs and not report.job_drift  # all variants done, yet not "stuck"
    held = [(h.job_id, h.status, h.reason) for h in report.held]
    assert held == [(job, "failed", "cancelled by support")]
    assert rebuild_jobs(conn, [job], dry_run=True) == []
    assert rebuild_jobs(conn, [job], dry_run=False) == []
    assert job_state(conn, job) == ("failed", None)


def test_a_hold_that_commits_while_the_processor_writes_is_never_overwritten(db, conn):
    """The hold commits after jobs_write's snapshot, before its row lock: the lock takes the newest
    row, which the snapshot's hold check did not see. The row is then retried, never written."""
    import threading

    from outbox.events import VariantStatus
    from processor import store
    from processor.database import connect
    from processor.fold import JobState

    rows = 100_000  # a statement long enough for the hold to commit inside it
    conn.execute(
        "INSERT INTO jobs (job_id, status, current_step) SELECT gen_random_uuid(), 'queued', 'ingest' "
        "FROM generate_series(1, %s)",
        [rows],
    )
    ids = [r[0] for r in conn.execute("SELECT job_id FROM jobs ORDER BY ctid")]
    retried = []
    target = ids[-1]  # the last row jobs_write's lock reaches (it scans jobs in order)
    for attempt in range(3):
        step = STEPS[1 + attempt % 2]  # every row changes, every time: a long statement
        states = {job: JobState(VariantStatus.RUNNING, step) for job in ids}
        result: list[store.JobsWritten] = []
        with (
            connect(db, application_name="holder", autocommit=False) as holder,
            connect(db, application_name="processor", autocommit=False) as writer,
        ):
            outbox.hold_job(holder, target, status="failed", reason="cancelled")  # row locked, not committed
            thread = threading.Thread(
                target=lambda w=writer, s=states, r=result: r.append(store.jobs_write(w, jobs=s, flags={}, folded=[]))
            )
            thread.start()
            # The processor's statement has begun locking rows (it has a transaction id: its snapshot,
            # without the hold, is taken) but has not reached the last one yet: commit the hold.
            wait_for(
                lambda: conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = 'processor' AND backend_xid IS NOT NULL"
                ).fetchone(),
                what="the processor's row locks",
            )
            holder.commit()
            thread.join()
            writer.commit()
        assert job_state(conn, target) == ("failed", None), "a committed hold was overwritten"
        retried.append(target in result[0].jobs_blocked)
        conn.execute("SELECT outbox_release_job(%s)", [target])
    # The hold committed inside the statement (the row retried, not written) at least once.
    assert any(retried), "the hold never committed inside the processor's statement: the test proved nothing"
