"""The database password never leaks: not in errors, not in the worker's log across reconnects, not in output.

The password of the private server (tests.reliability.fix_server) holds @#:/, so it is URL-encoded
in OUTBOX_DATABASE_URL; each form it could take (raw, %-encoded, +-encoded, and its unique core,
which finds any other encoding) is searched for in everything the commands print.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

import outbox as outbox_api
from processor.database import connect
from processor.fold import Pipeline
from processor.migrate import migrate
from tests.fix_database import TEST_STEPS, subprocess_env
from tests.helpers import WorkerProcess, wait_for
from tests.reliability.fix_server import OwnedServer, make_password, password_forms, url_with_password

STEPS = "ingest,detect,segment,iou_eval"


def outbox(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor.cli", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def assert_no_password(text: str, *passwords: str) -> None:
    for password in passwords:
        leaked = [form for form in password_forms(password) if form in text]
        assert not leaked, f"password leaked as {leaked}:\n{text}"


@pytest.fixture
def migrated(own_server: OwnedServer) -> OwnedServer:
    with connect(own_server.url, application_name="secrets-setup") as conn:
        migrate(conn, pipeline=Pipeline(TEST_STEPS))
    return own_server


def test_authentication_failure_is_one_error_line_without_any_password(migrated: OwnedServer):
    wrong = make_password("wrong")
    env = subprocess_env(url_with_password(migrated.port, wrong), OUTBOX_PIPELINE_STEPS=STEPS)
    for args in (("migrate",), ("run", "--until-idle"), ("backlog", "--json")):
        result = outbox(env, *args)
        assert result.returncode != 0, (args, result.stdout)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        assert "password authentication failed" in lines[0], (args, lines[0])
        assert_no_password(result.stdout + result.stderr, wrong, migrated.password)
        print(f"\n{' '.join(args)} with a wrong password: exit {result.returncode}, {lines[0]}")


def test_worker_log_holds_no_password_across_restarts(migrated: OwnedServer, tmp_path):
    restarts = 3
    with connect(migrated.url, application_name="secrets-setup") as conn, conn.transaction():
        _, (variant,) = outbox_api.create_job(conn, variants=1)
    env = subprocess_env(migrated.url, OUTBOX_PIPELINE_STEPS=STEPS)
    worker = WorkerProcess(env, tmp_path / "worker.log")  # --log-level DEBUG
    try:
        wait_for(lambda: "applied 1 events" in worker.output(), timeout=30, what="the worker to apply the job")
        for number in range(1, restarts + 1):
            migrated.restart("immediate")
            # A change after each restart: the reconnected worker logs its batch at DEBUG.
            with connect(migrated.url, application_name="secrets-writer") as conn, conn.transaction():
                outbox_api.update_variant(conn, variant, status="running", step=STEPS.split(",")[number - 1])
            wait_for(
                lambda number=number: worker.output().count("applied 1 events") > number,
                timeout=30,
                what=f"the worker to reconnect and apply after restart {number}",
            )
            assert worker.process.poll() is None, worker.output()
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.output()
    finally:
        worker.kill()
    log = worker.output()
    assert_no_password(log, migrated.password)
    reconnects = log.count("database unavailable")
    assert reconnects >= restarts, log
    assert " DEBUG " in log  # the most talkative level was on
    print(
        f"\nworker log at DEBUG: {restarts} immediate restarts, {reconnects} reconnect attempts logged, "
        f"{log.count('active consumer')} sessions, {len(log.splitlines())} log lines, no password"
    )


def test_migrate_and_backlog_output_holds_no_password(migrated: OwnedServer):
    env = subprocess_env(migrated.url, OUTBOX_PIPELINE_STEPS=STEPS)
    outputs = {}
    for args in (("migrate",), ("backlog",), ("backlog", "--json")):
        result = outbox(env, *args)
        assert result.returncode == 0, result.stderr
        assert_no_password(result.stdout + result.stderr, migrated.password)
        outputs[" ".join(args)] = result.stdout
    assert "***" in outputs["migrate"]  # the URL is shown, its password masked
    report = json.loads(outputs["backlog --json"])
    assert report["pending_events"] == 0
    print(f"\nmigrate, backlog, backlog --json: {sum(len(o) for o in outputs.values())} characters, no password")
