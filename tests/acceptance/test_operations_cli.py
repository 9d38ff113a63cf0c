"""The operations commands as subprocesses, their --json output parsed."""

from __future__ import annotations

import json
import signal

import outbox
from processor.database import connect
from tests.acceptance.test_cli import outbox_cli
from tests.fix_database import subprocess_env
from tests.helpers import WorkerProcess, consumer_os_pid, pending_work, wait_for, write_jobs_behind_the_processor


def write_jobs(engine, count: int) -> list:
    jobs = []
    with engine.begin() as conn:
        for _ in range(count):
            job, variants = outbox.create_job(conn, variants=2)
            for variant in variants:
                outbox.update_variant(conn, variant, status="done", step="iou_eval")
            jobs.append(job)
    return jobs


def cli_json(*args: str, env: dict[str, str]) -> tuple[int, dict]:
    result = outbox_cli(*args, "--json", env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_backlog_shows_pending_work_the_consumer_and_standbys(db, engine, tmp_path):
    env = subprocess_env(db)
    write_jobs(engine, 5)  # 5 jobs x 2 variants x 2 events
    code, report = cli_json("backlog", env=env)
    assert code == 0
    assert report["pending_events"] == 20 and report["consumer"] is None and report["standbys"] == 0
    assert outbox_cli("backlog", "--max-lag", "0", env=env).returncode == 3
    assert outbox_cli("backlog", "--max-lag", "3600", env=env).returncode == 0

    first = WorkerProcess(subprocess_env(db, OUTBOX_STANDBY_INTERVAL="0.1"), tmp_path / "first.log")
    second = WorkerProcess(subprocess_env(db, OUTBOX_STANDBY_INTERVAL="0.1"), tmp_path / "second.log")
    try:
        with connect(db, application_name="observer") as conn:
            wait_for(lambda: consumer_os_pid(conn) in (first.pid, second.pid), what="a worker to take the lock")
            wait_for(lambda: pending_work(conn) == 0, what="the backlog to drain")
            wait_for(lambda: "standby" in first.output() + second.output(), what="a standby")
        code, report = cli_json("backlog", env=env)
        assert report["pending_events"] == 0
        assert report["checkpoint"]["events_applied"] == 20
        assert report["consumer"]["pid"] in (first.pid, second.pid)
        assert report["standbys"] == 1
        table = outbox_cli("backlog", env=env)
        assert table.returncode == 0 and "pending events" in table.stdout
    finally:
        for worker in (first, second):
            worker.signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0


def test_replay_verify_and_dead_letters_from_the_command_line(db, engine):
    env = subprocess_env(db)
    jobs = write_jobs(engine, 4)
    assert outbox_cli("run", "--until-idle", env=env).returncode == 0
    code, report = cli_json("verify", env=env)
    assert code == 0 and report["drift"] is False

    with connect(db, application_name="vandal") as conn:
        write_jobs_behind_the_processor(conn, "UPDATE jobs SET status = 'running' WHERE job_id = %s", [jobs[0]])
        conn.execute(
            "INSERT INTO outbox_events (event_type, schema_version, job_id, variant_id, variant_version, payload) "
            "SELECT 'variant_changed', 7, job_id, job_variants_id, nextval('outbox_variant_versions'), '{}' "
            "FROM jobs_variants WHERE job_id = %s LIMIT 1",
            [jobs[1]],
        )
    code, report = cli_json("verify", env=env)
    assert code == 1 and report["drift"] is True
    assert report["stuck_jobs"] == [{"job_id": str(jobs[0]), "status": "running", "current_step": "iou_eval"}]

    code, preview = cli_json("replay", "--job", str(jobs[0]), "--dry-run", env=env)
    assert code == 0 and preview["changed"][0]["after"] == ["done", "iou_eval"]
    code, report = cli_json("verify", env=env)
    assert code == 1  # the dry run changed nothing
    code, done = cli_json("replay", "--job", str(jobs[0]), env=env)
    assert code == 0 and len(done["changed"]) == 1
    code, report = cli_json("verify", env=env)
    assert code == 0, report

    with connect(db, application_name="vandal") as conn:
        write_jobs_behind_the_processor(
            conn, "UPDATE jobs SET status = 'queued', current_step = NULL WHERE job_id = %s", [jobs[2]]
        )
    code, repaired = cli_json("verify", "--repair", env=env)
    assert code == 0 and repaired["drift"] is True and repaired["repaired"]["jobs_rebuilt"] == 1
    code, report = cli_json("verify", env=env)
    assert code == 0, report

    assert outbox_cli("run", "--until-idle", env=env).returncode == 0
    code, letters = cli_json("dead-letters", "list", env=env)
    assert code == 0 and len(letters) == 1 and "schema version 7" in letters[0]["reason"]
    retried = outbox_cli("dead-letters", "retry", str(letters[0]["event_id"]), env=env)
    assert retried.returncode == 1 and "still failing" in retried.stdout
    discarded = outbox_cli("dead-letters", "discard", str(letters[0]["event_id"]), env=env)
    assert discarded.returncode == 0 and "discarded" in discarded.stdout

    pruned = outbox_cli("prune", "--older-than", "0s", env=env)
    assert pruned.returncode == 0 and "pruned 17 events" in pruned.stdout
    code, report = cli_json("verify", env=env)
    assert code == 0
    bad = outbox_cli("prune", "--older-than", "soon", env=env)
    assert bad.returncode == 2 and "is not a number followed by s, m, h, d or w" in bad.stderr
    bad_job = outbox_cli("replay", "--job", "not-a-uuid", env=env)
    assert bad_job.returncode == 2 and "--job" in bad_job.stderr and "UUID" in bad_job.stderr
