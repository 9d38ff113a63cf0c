"""What the image and docker-compose.yml rely on: the health probe (`python -m processor.probe`, `outbox
healthcheck`) against a real worker, and an unattended `outbox migrate --show-plan` that refuses to
drop a legacy trigger unless told to."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from processor.database import connect
from processor.probe import probe_health
from tests.acceptance.test_cli import outbox_cli
from tests.acceptance.test_metrics import free_port
from tests.fix_database import subprocess_env
from tests.helpers import WorkerProcess, consumer_os_pid, wait_for

LEGACY_SCHEMA = (Path(__file__).parents[1] / "sql" / "legacy_schema.sql").read_text()


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def probe_module(port: int | str) -> subprocess.CompletedProcess[str]:
    env = subprocess_env(None, OUTBOX_METRICS_PORT=str(port))
    return subprocess.run(
        [sys.executable, "-m", "processor.probe"], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_the_probe_reports_what_answers_in_one_line_and_follows_no_redirect():
    """A 503 with a huge body stays one short line; a redirect is reported, never followed."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.server.server_port == big.server_port:
                body = ("x" * 99 + "\n") * 1000
                self.send_response(503)
                self.end_headers()
                self.wfile.write(body.encode())
            else:
                self.send_response(301)
                self.send_header("Location", "http://example.invalid/health")
                self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    big = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    moved = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    for server in (big, moved):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        line = one_error_line(probe_module(big.server_port).stderr)
        assert line.startswith(f"error: the worker on port {big.server_port} is unhealthy (503): xxx")
        assert len(line) < 400
        line = one_error_line(probe_module(moved.server_port).stderr)
        assert line.startswith(f"error: the worker on port {moved.server_port} is unhealthy (301)"), line
        assert "example.invalid" not in line
    finally:
        for server in (big, moved):
            server.shutdown()
            server.server_close()
    for bad in ("", "0", "http", "70000"):
        result = probe_module(bad)
        assert result.returncode == 1
        assert (
            one_error_line(result.stderr) == "error: OUTBOX_METRICS_PORT must be the worker's metrics port (1 to 65535)"
        )


def test_healthcheck_answers_for_a_running_worker_and_says_why_not(db, tmp_path):
    closed = free_port()
    nobody = outbox_cli("healthcheck", "--port", str(closed), env=subprocess_env(None))
    assert nobody.returncode == 1
    assert f"no worker answering on port {closed}" in one_error_line(nobody.stderr)

    port = free_port()
    env = subprocess_env(db, OUTBOX_METRICS_PORT=str(port), OUTBOX_STANDBY_INTERVAL="0.2")
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        with connect(db, application_name="operator") as conn:
            wait_for(lambda: consumer_os_pid(conn) == worker.pid, what="the worker to start")
            wait_for(lambda: probe_health("127.0.0.1", port, 5) is None, what="/health to answer ok")
            healthy = outbox_cli("healthcheck", env=subprocess_env(None, OUTBOX_METRICS_PORT=str(port)))
            assert healthy.returncode == 0, healthy.stderr
            assert f"port {port} is healthy" in healthy.stdout
            image_probe = probe_module(port)  # the image's HEALTHCHECK: the same answer
            assert image_probe.returncode == 0 and f"port {port} is healthy" in image_probe.stdout, image_probe.stderr

            # A problem /health reports (503) is the reason the probe gives.
            conn.execute(
                "CREATE FUNCTION sneaky() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "UPDATE ONLY jobs SET status = 'done' WHERE job_id = NEW.job_id; RETURN NULL; END $$;"
                "CREATE TRIGGER sneaky AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION sneaky()"
            )
            wait_for(lambda: probe_health("127.0.0.1", port, 5), timeout=20, what="/health to fail")
            sick = outbox_cli("healthcheck", "--port", str(port), env=subprocess_env(None))
            assert sick.returncode == 1
            line = one_error_line(sick.stderr)
            assert f"the worker on port {port} is unhealthy (503)" in line
            assert "legacy trigger sneaky on jobs_variants writes job state" in line
            assert one_error_line(probe_module(port).stderr) == line
    finally:
        worker.kill()


def test_migrate_shows_its_plan_and_refuses_to_drop_a_legacy_trigger_unless_told_to(empty_db):
    with connect(empty_db, application_name="team") as conn:
        conn.execute(LEGACY_SCHEMA.encode())
        job = uuid.uuid4()
        conn.execute("INSERT INTO jobs (job_id, status, current_step) VALUES (%s, 'running', 'ingest')", [job])
        conn.execute(
            "INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step) "
            "VALUES (%s, %s, 'done', 'ingest')",
            [uuid.uuid4(), job],
        )

    def untouched() -> bool:
        with connect(empty_db, application_name="team") as conn:
            trigger = conn.execute("SELECT 1 FROM pg_trigger WHERE tgname = 'check_all_variants_done_trigger'")
            schema = conn.execute("SELECT to_regclass('outbox_schema_migrations')").fetchone()
            return trigger.fetchone() is not None and schema is not None and schema[0] is None

    refuse = subprocess_env(empty_db, OUTBOX_LEGACY_TRIGGER="refuse")
    shown = outbox_cli("migrate", "--show-plan", env=refuse)
    assert shown.returncode == 1
    assert "outbox migrate on" in shown.stdout and "will:" in shown.stdout  # the plan first
    assert "drop legacy trigger check_all_variants_done_trigger" in shown.stdout
    line = one_error_line(shown.stderr)
    assert "migrate refuses: the legacy trigger check_all_variants_done_trigger" in line
    assert "OUTBOX_LEGACY_TRIGGER=replace" in line and "nothing was changed" in line
    assert untouched()

    # Without the plan, migrate itself refuses, in its transaction (a trigger created after a plan was read).
    direct = outbox_cli("migrate", "--legacy-trigger", "refuse", env=subprocess_env(empty_db))
    assert direct.returncode == 1
    assert "the legacy trigger check_all_variants_done_trigger" in one_error_line(direct.stderr)
    assert untouched()
    dry = outbox_cli("migrate", "--dry-run", env=refuse)
    assert dry.returncode == 1 and "migrate would refuse: the legacy trigger" in one_error_line(dry.stderr)

    replaced = outbox_cli("migrate", "--show-plan", env={**refuse, "OUTBOX_LEGACY_TRIGGER": "replace"})
    assert replaced.returncode == 0, replaced.stderr
    assert "drop legacy trigger check_all_variants_done_trigger" in replaced.stdout
    assert "removed legacy trigger check_all_variants_done_trigger" in replaced.stdout
    assert not untouched()
    again = outbox_cli("migrate", "--show-plan", env=refuse)  # nothing left to refuse
    assert again.returncode == 0 and "up to date" in again.stdout, again.stderr
