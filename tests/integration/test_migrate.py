"""migrate: versioned, idempotent, adopts existing tables and data, removes the legacy trigger."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from processor import fold_config
from processor.database import connect
from processor.errors import SchemaError
from processor.fold import Pipeline
from processor.migrate import check_ready, latest_version, migrate, migrations
from processor.store import migrations as schema_store
from processor.worker import Worker
from tests.fix_database import TEST_STEPS, make_settings
from tests.helpers import drain, job_state

LEGACY_SCHEMA = (Path(__file__).parents[1] / "sql" / "legacy_schema.sql").read_text()


def test_migrate_twice_changes_nothing_the_second_time(empty_db):
    with connect(empty_db, application_name="t") as conn:
        first = migrate(conn, pipeline=Pipeline(TEST_STEPS))
        second = migrate(conn)
        assert [m.version for m in first.applied] == [m.version for m in migrations()]
        assert second.applied == [] and second.already_applied == len(migrations())
        check_ready(conn)


def test_adoption_keeps_data_and_computes_existing_jobs_from_their_variants(empty_db):
    done_job, running_job, bad_job = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with connect(empty_db, application_name="t") as conn:
        conn.execute(LEGACY_SCHEMA.encode())
        conn.execute(
            "ALTER TABLE jobs_variants ADD COLUMN payload text DEFAULT 'app data';"
            "ALTER TABLE jobs_variants DISABLE TRIGGER check_all_variants_done_trigger"
        )
        for job in (done_job, running_job, bad_job):
            conn.execute("INSERT INTO jobs (job_id, status, current_step) VALUES (%s, 'running', 'ingest')", [job])
        rows = [
            (done_job, "done", "iou_eval"),
            (done_job, "done", "iou_eval"),  # stuck: all done, job running
            (running_job, "done", "iou_eval"),
            (running_job, "running", "segment"),
            (bad_job, "done", "iou_eval"),
            (bad_job, "pending", "detect"),  # a status the product refuses
        ]
        for job, status, step in rows:
            conn.execute(
                "INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step) VALUES (%s, %s, %s, %s)",
                [uuid.uuid4(), job, status, step],
            )

        report = migrate(conn, pipeline=Pipeline(TEST_STEPS))
        assert [(t.trigger, t.function) for t in report.removed_triggers] == [
            ("check_all_variants_done_trigger", "check_all_variants_done()")
        ]
        drain(make_settings(empty_db))

        assert job_state(conn, done_job) == ("done", "iou_eval")
        assert job_state(conn, running_job) == ("running", "segment")
        # The unreadable variant is not dropped from its job: the job is flagged and left as it was.
        assert job_state(conn, bad_job) == ("running", "ingest")
        (reason,) = conn.execute("SELECT reason FROM outbox_job_flags WHERE job_id = %s", [bad_job]).fetchone()
        assert "'pending'" in reason or "status" in reason
        assert conn.execute("SELECT count(*) FROM outbox_dead_letters").fetchone()[0] == 1
        # The application's data and columns are untouched.
        assert conn.execute("SELECT count(*) FROM jobs_variants WHERE payload = 'app data'").fetchone()[0] == 6
        # The first fold of an adopted job writes its first transition, from the state the row had.
        transitions = conn.execute(
            "SELECT job_id, from_status, from_step, to_status, to_step FROM outbox_job_transitions ORDER BY 1"
        ).fetchall()
        assert sorted(transitions) == sorted([
            (done_job, "running", "ingest", "done", "iou_eval"),
            (running_job, "running", "ingest", "running", "segment"),
        ])  # fmt: skip


def test_the_worker_refuses_an_unmigrated_database_or_a_legacy_trigger(empty_db):
    settings = make_settings(empty_db)
    with pytest.raises(SchemaError, match="run `outbox migrate` first"):
        Worker(settings, empty_db).run(until_idle=True)
    with connect(empty_db, application_name="t") as conn:
        migrate(conn, pipeline=Pipeline(TEST_STEPS))
        conn.execute(
            "CREATE FUNCTION sneaky() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "UPDATE jobs SET status = 'done' WHERE job_id = NEW.job_id; RETURN NEW; END $$;"
            "CREATE TRIGGER sneaky AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION sneaky()"
        )
    with pytest.raises(SchemaError, match=r"legacy trigger.*sneaky"):
        Worker(settings, empty_db).run(until_idle=True)


def test_a_step_missing_from_the_pipeline_flags_the_job_until_the_setting_is_fixed(db, conn, engine):
    import outbox

    with engine.begin() as sa:
        job, (v1, v2) = outbox.create_job(sa, variants=2)
    conn.execute("UPDATE jobs_variants SET status = 'done', current_step = 'iou_eval' WHERE job_variants_id = %s", [v1])
    conn.execute(
        "UPDATE jobs_variants SET status = 'running', current_step = 'polish' WHERE job_variants_id = %s", [v2]
    )
    drain(make_settings(db))
    assert job_state(conn, job) == ("queued", None)  # left as create_job wrote it, not guessed
    (reason,) = conn.execute("SELECT reason FROM outbox_job_flags WHERE job_id = %s", [job]).fetchone()
    assert "'polish' is not in the pipeline" in reason

    fold_config.change(conn, Pipeline(("ingest", "detect", "polish", "segment", "iou_eval")), None)
    drain(make_settings(db, pipeline_steps="ingest,detect,polish,segment,iou_eval"))
    assert job_state(conn, job) == ("running", "polish")
    assert conn.execute("SELECT count(*) FROM outbox_job_flags").fetchone()[0] == 0


def test_a_fresh_install_has_every_object_under_the_product_prefix(db, conn):
    objects = conn.execute(
        """
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'S', 'i')
        UNION ALL SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace
        UNION ALL SELECT tgname FROM pg_trigger WHERE NOT tgisinternal
        """
    ).fetchall()
    application = {"jobs", "jobs_pkey", "jobs_variants", "jobs_variants_pkey"}
    assert all(name.startswith("outbox_") or name in application for (name,) in objects), objects


def test_a_later_migration_cannot_readmit_a_worker_an_earlier_one_stopped_serving(empty_db):
    """Migrations 14 (serving 14), 15 (serving 15), 16 (serving 14): 15 may have dropped what a version-14
    worker calls, so the schema serves workers from 15 on, whatever 16 declares (decision 0013)."""
    worker = latest_version()
    with connect(empty_db, application_name="t") as conn:
        migrate(conn, pipeline=Pipeline(TEST_STEPS))
        conn.execute(
            "INSERT INTO outbox_schema_migrations (version, name, serves_workers_from) "
            "VALUES (%s, 'stops_serving', %s), (%s, 'serves_again', %s)",
            [worker + 1, worker + 1, worker + 2, worker],
        )
        state = schema_store.migrations_state(conn)
        assert (state.version, state.serves_workers_from) == (worker + 2, worker + 1)
        with pytest.raises(SchemaError) as refused:
            check_ready(conn)
        assert str(refused.value) == (
            f"the outbox schema is at version {worker + 2}, newer than this worker knows ({worker}), and serves "
            f"workers of version {worker + 1} and newer: upgrade the worker"
        )
        conn.execute("DELETE FROM outbox_schema_migrations WHERE version = %s", [worker + 1])
        check_ready(conn)  # without 15, 16 serving 14 serves this worker
