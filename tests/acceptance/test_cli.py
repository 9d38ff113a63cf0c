"""The `outbox` command as a subprocess, against a real database."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

import outbox
from processor.database import connect
from tests.fix_database import subprocess_env
from tests.helpers import WorkerProcess, consumer_os_pid, job_state, wait_for


def outbox_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_migrate_then_run_until_idle(empty_db, engine_factory):
    env = subprocess_env(empty_db)
    first = outbox_cli("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_initial" in first.stdout
    again = outbox_cli("migrate", env=env)
    assert again.returncode == 0 and "up to date" in again.stdout

    engine = engine_factory(empty_db)
    with engine.begin() as conn:
        job, variants = outbox.create_job(conn, variants=2)
        for variant in variants:
            outbox.update_variant(conn, variant, status="done", step="iou_eval")
    run = outbox_cli("run", "--until-idle", env=env)
    assert run.returncode == 0, run.stderr
    assert "processed 4 events" in run.stdout
    with connect(empty_db, application_name="t") as conn:
        assert job_state(conn, job) == ("done", "iou_eval")


def test_demo_against_a_database_reports_no_stuck_job(db):
    args = ("demo", "--jobs", "15", "--writers", "4", "--seed", "7")
    result = outbox_cli(*args, "--json", env=subprocess_env(db))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["jobs"] == summary["jobs_done"] == 15
    assert summary["jobs_stuck"] == 0
    assert summary["events_processed"] >= summary["variant_updates_written"] > 0
    assert "jobs done" in result.stderr  # the live progress

    table = outbox_cli(*args, env=subprocess_env(db))
    assert table.returncode == 0 and "jobs stuck" in table.stdout


def test_sigterm_stops_the_worker_cleanly(db, tmp_path):
    worker = WorkerProcess(subprocess_env(db), tmp_path / "worker.log")
    with connect(db, application_name="observer") as conn:
        wait_for(lambda: consumer_os_pid(conn) == worker.pid, what="the worker to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert "SIGTERM: stopping after the batch in hand" in worker.output()


@pytest.mark.parametrize(
    ("args", "extra_env", "code", "message"),
    [
        (["run", "--batch-size", "0"], {}, 2, "OUTBOX_BATCH_SIZE"),
        (["run"], {"OUTBOX_PIPELINE_STEPS": "a,b,a"}, 1, "OUTBOX_PIPELINE_STEPS: pipeline steps must be unique"),
        (["run"], {"OUTBOX_PIPELINE_STEPS": ""}, 1, "OUTBOX_PIPELINE_STEPS"),
        (["run"], {"OUTBOX_POLL_INTERVAL_MAX": "-1"}, 1, "OUTBOX_POLL_INTERVAL_MAX"),
        (["migrate", "--database-url", "mysql://app:s3cr3t@h/db"], {}, 1, "scheme 'mysql' is not supported"),
        (["migrate", "--database-url", "postgresql://app:s3cr3t@127.0.0.1:1/db"], {}, 1, "database error"),
        (["run", "--until-idle", "--database-url", "postgresql://app:s3cr3t@127.0.0.1:1/db"], {}, 1, "error"),
        (["demo", "--jobs", "-3"], {}, 2, "--jobs"),
        (["frobnicate"], {}, 2, "No such command"),
        (["replay", "--job", "not-a-uuid"], {}, 2, "valid UUID"),
        (["dead-letters", "retry"], {}, 2, "give one or more event ids"),
        (["prune", "--older-than", "-5d"], {}, 2, "is not a number followed by"),
        (["prune", "--older-than", "99999999999d"], {}, 2, "longer than 100 years"),
        (["run", "--partition", "3", "--until-idle"], {}, 1, "partition 3 does not exist"),
    ],
)
def test_bad_input_gives_one_clear_line_and_no_secret(db, args, extra_env, code, message):
    result = outbox_cli(*args, env=subprocess_env(db, **extra_env), timeout=60)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "s3cr3t" not in result.stdout + result.stderr
    assert result.stderr.strip().startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.embedded
def test_with_no_database_configured_the_embedded_server_is_created_and_migrated(tmp_path):
    env = subprocess_env(None, OUTBOX_EMBEDDED_DATA_DIR=str(tmp_path / "pgdata"))
    run = outbox_cli("run", "--until-idle", env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "processed 0 events" in run.stdout
    demo = outbox_cli("demo", "--jobs", "5", "--writers", "2", env=env, timeout=300)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "embedded" not in demo.stderr.lower() or "error" not in demo.stderr.lower()
    assert (tmp_path / "pgdata" / "PG_VERSION").exists()
