"""Adopting the product on a real team's database, with the CLI as a subprocess.

The team's shape: NOT NULL columns of its own, status columns of its own type (text, an enum, a
domain, varchar), the legacy aggregation trigger in every form detection used to miss, an
application AFTER trigger on jobs_variants, a touch_updated_at trigger, and a NOTIFY trigger on
jobs. Writers keep writing through `outbox migrate --dry-run` (which changes nothing) and `outbox
migrate`; afterwards every job equals the reference computed from jobs_variants.
"""

from __future__ import annotations

import random
import uuid

import psycopg
import pytest

from processor import workload
from processor.database import connect
from tests.acceptance.test_cli import outbox_cli
from tests.fix_database import subprocess_env
from tests.helpers import AUTO_ADVANCE
from tests.reference import actual_job_states, reference_job_states

STEPS = ("ingest", "detect", "segment", "iou_eval")
STATUSES = ("queued", "running", "done", "failed")

# The status and step columns, as teams declare them.
KINDS = {
    "text": ("", "text", "text", "text", "text"),
    "enum": (
        "CREATE TYPE job_status AS ENUM ('queued', 'running', 'done', 'failed', 'cancelled');",
        "job_status",
        "text",
        "job_status",
        "text",
    ),
    "enum in jobs only": (
        "CREATE TYPE job_status AS ENUM ('queued', 'running', 'done', 'failed');",
        "job_status",
        "text",
        "text",
        "text",
    ),
    "domain": (
        "CREATE DOMAIN status_t AS text CHECK (VALUE IN ('queued', 'running', 'done', 'failed'));",
        "status_t",
        "varchar(32)",
        "status_t",
        "varchar(32)",
    ),
    "varchar": ("", "varchar(16)", "varchar(32)", "varchar(16)", "varchar(32)"),
    # char(n) is bpchar (a cast to "character" would be char(1)); a domain over varchar(n) refuses
    # a longer value (an explicit cast would cut it short).
    "char, domain over varchar": ("CREATE DOMAIN step_t AS varchar(10);", "char(8)", "step_t", "char(8)", "step_t"),
}

# The legacy aggregation trigger, in each form that name or text matching used to miss.
LEGACY_FORMS = {
    "update only": "UPDATE ONLY jobs SET status = 'running' WHERE job_id = NEW.job_id;",
    "a comment in between": "UPDATE /* keep the job in step */ jobs SET status = 'running' WHERE job_id = NEW.job_id;",
    "dynamic sql": "EXECUTE format('UPDATE %I SET status = %L WHERE job_id = %L', 'jobs', 'running', NEW.job_id);",
    "upsert": (
        "INSERT INTO jobs (job_id, user_id, status) VALUES (NEW.job_id, 0, 'running') "
        "ON CONFLICT (job_id) DO UPDATE SET status = 'running';"
    ),
    "a helper function": "PERFORM legacy_helper_touch_job(NEW.job_id);",
}


def team_schema(kind: str) -> str:
    type_sql, job_status, job_step, variant_status, variant_step = KINDS[kind]
    legacy = "".join(
        f"""
        CREATE FUNCTION legacy_{i}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN {body} RETURN NULL; END $$;
        CREATE TRIGGER legacy_{i} AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION legacy_{i}();
        """
        for i, body in enumerate(LEGACY_FORMS.values())
    )
    return f"""
        {type_sql}
        CREATE TABLE jobs (
            job_id uuid PRIMARY KEY,
            user_id integer NOT NULL,
            status {job_status},
            current_step {job_step},
            updated_at timestamptz NOT NULL DEFAULT now(),
            note text
        );
        CREATE TABLE jobs_variants (
            job_variants_id uuid PRIMARY KEY,
            job_id uuid NOT NULL REFERENCES jobs,
            model text NOT NULL,
            status {variant_status},
            current_step {variant_step},
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX jobs_variants_job_idx ON jobs_variants (job_id, status);
        CREATE FUNCTION touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN NEW.updated_at := now(); RETURN NEW; END $$;
        CREATE TRIGGER touch_updated_at BEFORE UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
        CREATE TRIGGER touch_updated_at BEFORE UPDATE ON jobs_variants
            FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
        CREATE FUNCTION notify_job_state() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_notify('job_state', NEW.job_id::text); RETURN NULL; END $$;
        CREATE TRIGGER notify_job_state AFTER UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION notify_job_state();
        CREATE FUNCTION legacy_helper_touch_job(p_job uuid) RETURNS void LANGUAGE plpgsql AS $$
        BEGIN UPDATE jobs SET status = 'running' WHERE job_id = p_job; END $$;
        {legacy}
        {AUTO_ADVANCE}
        CREATE TRIGGER a_auto_advance AFTER UPDATE ON jobs_variants
            FOR EACH ROW WHEN (random() < 0.2) EXECUTE FUNCTION app_auto_advance();
    """


def fill(conn: psycopg.Connection, rng: random.Random, jobs: int) -> list[uuid.UUID]:
    variants = []
    for _ in range(jobs):
        job = uuid.uuid4()
        conn.execute(
            "INSERT INTO jobs (job_id, user_id, status, current_step) VALUES (%s, 7, 'running', 'ingest')", [job]
        )
        for _ in range(rng.randint(2, 4)):
            variant = uuid.uuid4()
            status, step = rng.choice([("done", "iou_eval"), ("done", "iou_eval"), ("running", "segment")])
            conn.execute(
                "INSERT INTO jobs_variants (job_variants_id, job_id, model, status, current_step) "
                "VALUES (%s, %s, 'resnet', %s, %s)",
                [variant, job, status, step],
            )
            variants.append(variant)
    return variants


def outbox_tables(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'outbox\\_%%' AND relkind = 'r'").fetchone()[
        0
    ]


@pytest.mark.parametrize("kind", list(KINDS))
def test_adoption_on_the_team_schema_under_writers_ends_equal_to_the_reference(kind, empty_db):
    env = subprocess_env(empty_db)
    rng = random.Random(13)
    with connect(empty_db, application_name="team-setup") as conn:
        conn.execute(team_schema(kind).encode())
        variants = fill(conn, rng, 40)
        legacy_before = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'legacy\\_%%'").fetchone()[0]
        # The team's own code: plain-SQL updates of jobs_variants, until stopped (processor.workload).
        with workload.UpdateWriters(empty_db, variants, writers=4, seed=13, statuses=STATUSES) as writers:
            dry = outbox_cli("migrate", "--dry-run", env=env)
            assert dry.returncode == 0, dry.stdout + dry.stderr
            assert "nothing was changed" in dry.stdout
            for i in range(len(LEGACY_FORMS)):
                assert f"drop legacy trigger legacy_{i}" in dry.stdout, dry.stdout
            assert "use the existing index jobs_variants_job_idx" in dry.stdout
            assert outbox_tables(conn) == 0  # nothing changed
            assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'legacy\\_%%'").fetchone()[0] == (
                legacy_before
            )

            migrated = outbox_cli("migrate", env=env)
            assert migrated.returncode == 0, migrated.stdout + migrated.stderr
            for i in range(len(LEGACY_FORMS)):
                assert f"removed legacy trigger legacy_{i}" in migrated.stdout, migrated.stdout
            writers.stop()
        assert not writers.errors, repr(writers.errors[0])
        assert writers.written > 0
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'legacy\\_%%'").fetchone()[0] == 0
        # The application's index is used, not doubled.
        assert conn.execute("SELECT to_regclass('outbox_jobs_variants_job_id_idx')").fetchone()[0] is None

        run = outbox_cli("run", "--until-idle", env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        expected = reference_job_states(conn, STEPS)
        actual = actual_job_states(conn)
        wrong = {job: (actual.get(job), state) for job, state in expected.items() if actual.get(job) != state}
        assert not wrong, f"{len(wrong)} of {len(expected)} jobs wrong: {list(wrong.items())[:3]}"
        check = outbox_cli("check", env=env)
        assert check.returncode == 0, check.stdout + check.stderr

        # Drift made behind the capture (replica mode fires no trigger) is found and repaired, in
        # the columns' own types.
        conn.execute(
            "SET session_replication_role = replica;"
            "UPDATE jobs_variants SET status = 'failed', current_step = 'detect' "
            "WHERE job_variants_id = "
            "    (SELECT job_variants_id FROM jobs_variants WHERE status::text <> 'failed' ORDER BY 1 LIMIT 1);"
            "RESET session_replication_role"
        )
        verify = outbox_cli("verify", "--repair", "--wait", "0", env=env)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "1 resync events written" in verify.stdout, verify.stdout
        run = outbox_cli("run", "--until-idle", env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert actual_job_states(conn) == reference_job_states(conn, STEPS)


def test_a_step_longer_than_a_domain_over_varchar_allows_is_refused_up_front(empty_db):
    env = subprocess_env(empty_db, OUTBOX_PIPELINE_STEPS="ingest,detect,segment,iou_evaluation")
    with connect(empty_db, application_name="team-setup") as conn:
        conn.execute(team_schema("char, domain over varchar").encode())
        for command in (("migrate", "--dry-run"), ("migrate",)):
            refused = outbox_cli(*command, env=env)
            assert refused.returncode != 0
            assert "jobs.current_step (step_t) is too short for the pipeline step 'iou_evaluation'" in refused.stderr
            assert "nothing was changed" in refused.stderr
        assert outbox_tables(conn) == 0


def test_only_a_btree_index_on_job_id_is_taken_for_the_product_s_own(empty_db):
    env = subprocess_env(empty_db)
    with connect(empty_db, application_name="team-setup") as conn:
        conn.execute(team_schema("text").replace("(job_id, status)", "USING hash (job_id)").encode())
        dry = outbox_cli("migrate", "--dry-run", env=env)
        assert "create index outbox_jobs_variants_job_id_idx" in dry.stdout, dry.stdout
        assert outbox_cli("migrate", env=env).returncode == 0
        assert conn.execute("SELECT to_regclass('outbox_jobs_variants_job_id_idx')").fetchone()[0] is not None


def test_an_upgrade_s_plan_lists_the_triggers_it_restores_and_the_casts_it_writes(db):
    env = subprocess_env(db)
    with connect(db, application_name="team-setup") as conn:
        # A database one migration behind, whose capture trigger was disabled and whose status
        # column became an enum meanwhile.
        conn.execute(
            "DELETE FROM outbox_schema_migrations WHERE version = (SELECT max(version) FROM outbox_schema_migrations);"
            "ALTER TABLE jobs_variants DISABLE TRIGGER outbox_capture_variant_update;"
            "CREATE TYPE job_status AS ENUM ('queued', 'running', 'done', 'failed');"
            "ALTER TABLE jobs ALTER status TYPE job_status USING status::job_status"
        )
        dry = outbox_cli("migrate", "--dry-run", env=env)
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert "apply migration 00" in dry.stdout
        assert "restore trigger outbox_capture_variant_update on jobs_variants (it is disabled)" in dry.stdout
        assert "write outbox_job_status() for jobs.status (job_status)" in dry.stdout
        migrated = outbox_cli("migrate", env=env)
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        assert "restored trigger outbox_capture_variant_update" in migrated.stdout
        check = outbox_cli("check", env=env)
        assert check.returncode == 0, check.stdout + check.stderr
