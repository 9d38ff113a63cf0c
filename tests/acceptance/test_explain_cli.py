"""`outbox explain JOB_ID` as a subprocess: the tables, --json, and one line for bad input."""

from __future__ import annotations

import json
import uuid

import pytest

import outbox
from processor.database import connect
from tests.acceptance.test_cli import outbox_cli
from tests.fix_database import subprocess_env
from tests.helpers import drain


@pytest.fixture
def running_job(engine, settings):
    """A job: two variants done, one running at `segment`, one more change not applied yet."""
    with engine.begin() as c:
        job_id, ids = outbox.create_job(c, variants=3)
    moves = [(ids[0], "done", "iou_eval"), (ids[1], "done", "iou_eval"), (ids[2], "running", "segment")]
    for variant, status, step in moves:
        with engine.begin() as c:
            outbox.update_variant(c, variant, status=status, step=step)
    drain(settings)
    with engine.begin() as c:
        outbox.update_variant(c, ids[2], status="running", step="iou_eval")  # in flight: no worker runs
    return job_id, ids


def test_explain_prints_the_decision_and_every_part(db, running_job):
    job_id, ids = running_job
    with connect(db, application_name="support-console", autocommit=False) as writer:
        writer.execute("UPDATE jobs_variants SET status = 'failed' WHERE job_variants_id = %s", [ids[0]])
        result = outbox_cli("explain", str(job_id), "--events", "5", env=subprocess_env(db, COLUMNS="250"))
        writer.rollback()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    decision = f"running at `segment`: 2 of 3 variants done at `iou_eval`, variant {ids[2]} is `running` at `segment`"
    assert decision in out
    assert "the job row is the fold of its variants' stored states" in out
    assert "in flight" in out and "applied" in out and "stored state" in out
    assert f"variant {ids[0]}: invisible change: transaction " in out and "support-console" in out
    assert "dead letters: none" in out and "transitions (newest first)" in out
    assert "no worker holds this partition" in out


def test_explain_json(db, running_job):
    job_id, ids = running_job
    result = outbox_cli("explain", str(job_id), "--json", env=subprocess_env(db))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["job_id"] == str(job_id)
    assert document["fold"]["status"] == "running" and document["fold"]["job_row_matches"] is True
    assert sorted(v["variant_id"] for v in document["variants"]) == sorted(str(i) for i in ids)
    (late,) = [v for v in document["variants"] if v["variant_id"] == str(ids[2])]
    assert [e["state"] for e in late["events"]] == ["in_flight", "applied", "applied"]
    assert late["agreement"] == "in_flight" and late["events_pending"] == 1
    # Every key and type: tests/integration/test_explain.py.
    assert set(document) == {
        "job_id", "partition", "job", "hold", "flag", "awaiting_fold", "row_lock", "checkpoint", "fold", "variants",
        "dead_letters", "transitions",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("job", "message"),
    [("not-a-uuid", "error: not a job id (a UUID): 'not-a-uuid'"), (str(uuid.UUID(int=7)), "error: no such job: ")],
)
def test_bad_job_id_is_one_line(db, job, message):
    result = outbox_cli("explain", job, env=subprocess_env(db))
    assert result.returncode == 1
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""
    as_json = outbox_cli("explain", job, "--json", env=subprocess_env(db))
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["ok"] is False
