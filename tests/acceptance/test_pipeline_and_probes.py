"""The pipeline as adopters meet it (unset, mismatched, refused shapes, a typo at write time), and
the monitoring probe `outbox check` with its --json document."""

from __future__ import annotations

import json
import uuid

import pytest

import outbox
from processor.database import connect
from tests.acceptance.test_cli import outbox_cli
from tests.fix_database import subprocess_env


def team_variants(empty_db, steps: list[str]) -> None:
    with connect(empty_db, application_name="team") as conn:
        conn.execute(
            "CREATE TABLE jobs (job_id uuid PRIMARY KEY, status text, current_step text, updated_at timestamptz);"
            "CREATE TABLE jobs_variants (job_variants_id uuid PRIMARY KEY, job_id uuid REFERENCES jobs,"
            " status text, current_step text, updated_at timestamptz)"
        )
        job = uuid.uuid4()
        conn.execute("INSERT INTO jobs VALUES (%s, 'running', NULL, now())", [job])
        for step in steps:
            conn.execute("INSERT INTO jobs_variants VALUES (gen_random_uuid(), %s, 'running', %s, now())", [job, step])


def test_migrate_without_a_pipeline_refuses_steps_the_default_lacks_and_names_them(empty_db):
    team_variants(empty_db, ["detect", "segment", "inpaint", "iou_eval"])
    env = {k: v for k, v in subprocess_env(empty_db).items() if k != "OUTBOX_PIPELINE_STEPS"}
    dry = outbox_cli("migrate", "--dry-run", env=env)
    assert dry.returncode == 1 and "'inpaint'" in dry.stderr and "OUTBOX_PIPELINE_STEPS" in dry.stderr
    refused = outbox_cli("migrate", env=env)
    assert refused.returncode == 1
    line = refused.stderr.strip()
    assert len(line.splitlines()) == 1 and "'detect'" in line and "nothing was changed" in line, line
    with connect(empty_db, application_name="t") as conn:
        assert conn.execute("SELECT to_regclass('outbox_events')").fetchone()[0] is None  # nothing changed
    ok = outbox_cli("migrate", env={**env, "OUTBOX_PIPELINE_STEPS": "detect,segment,inpaint,iou_eval"})
    assert ok.returncode == 0, ok.stderr
    shown = outbox_cli("pipeline", "show", "--json", env=env)
    assert json.loads(shown.stdout)["pipeline_steps"] == ["detect", "segment", "inpaint", "iou_eval"]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ("ingest preprocess inference iou_eval", "without spaces"),
        (f"ingest,{'x' * 250},iou_eval", "at most 200 characters"),
        ("ingest,detect,ingest", "repeated: ingest"),
        ("ingest,,iou_eval", "non-empty"),
    ],
)
def test_refused_pipeline_shapes(db, steps, message):
    env = subprocess_env(db)
    result = outbox_cli("pipeline", "set", steps, env=env)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    run = outbox_cli("run", "--until-idle", env={**env, "OUTBOX_PIPELINE_STEPS": steps})
    assert run.returncode != 0 and message in run.stderr


def test_the_run_help_shows_the_pipeline_and_the_failure_policy():
    result = outbox_cli("run", "--help", env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert "OUTBOX_PIPELINE_STEPS" in result.stdout and "OUTBOX_FAILURE_POLICY" in result.stdout


def test_update_variant_refuses_a_step_the_pipeline_lacks(engine):
    with engine.begin() as sa:
        _, (variant,) = outbox.create_job(sa, variants=1)
    with pytest.raises(outbox.UnknownStepError, match="'segmnet' is not in the pipeline"), engine.begin() as sa:
        outbox.update_variant(sa, variant, status="running", step="segmnet")
    with pytest.raises(outbox.UnknownStepError), engine.begin() as sa:
        outbox.create_job(sa, variants=1, step="segmnet")
    with pytest.raises(outbox.VariantNotFoundError), engine.begin() as sa:
        outbox.update_variant(sa, uuid.uuid4(), status="running", step="detect")


def test_check_fails_on_what_needs_a_person_and_always_prints_a_document(db, engine):
    env = subprocess_env(db)
    ok = outbox_cli("check", "--json", env=env)
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True, ok.stdout
    with engine.begin() as sa:
        job, (variant,) = outbox.create_job(sa, variants=1)
    # Pending work and no worker: the lag limit and the workers check fail.
    lagging = json.loads(outbox_cli("check", "--json", "--max-lag", "0", env=env).stdout)
    failed = {c["name"] for c in lagging["checks"] if not c["ok"]}
    assert failed == {"lag", "workers"}, lagging
    assert outbox_cli("run", "--until-idle", env=env).returncode == 0
    with connect(db, application_name="vandal") as conn:
        conn.execute(
            "INSERT INTO outbox_events (event_type, schema_version, job_id, variant_id, variant_version, payload) "
            "VALUES ('variant_changed', 1, %s, %s, NULL, '{\"status\": \"done\"}')",
            [job, variant],
        )
    assert outbox_cli("run", "--until-idle", env=env).returncode == 0
    result = outbox_cli("check", "--json", env=env)
    document = json.loads(result.stdout)
    assert result.returncode == 1
    failed = {c["name"] for c in document["checks"] if not c["ok"]}
    assert failed == {"flagged jobs", "dead letters"}, document  # the event without a version holds its job
    unreachable = outbox_cli(
        "check", "--json", env={**env, "OUTBOX_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    )
    assert unreachable.returncode == 1 and json.loads(unreachable.stdout)["ok"] is False
    assert json.loads(outbox_cli("backlog", "--json", "--partition", "5", env=env).stdout)["error"]


def test_version_and_a_transient_prune_progress(db):
    from importlib.metadata import version

    env = subprocess_env(db)
    shown = outbox_cli("--version", env=env)
    assert shown.returncode == 0 and version("pg-outbox-processor") in shown.stdout
    pruned = outbox_cli("prune", "--older-than", "0s", env=env)
    assert pruned.returncode == 0 and "pruning" not in pruned.stderr, pruned.stderr
