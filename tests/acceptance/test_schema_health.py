"""A running worker notices, within a standby interval, the product's triggers disabled or dropped
and a legacy trigger created: it logs it, /health answers 503 with the problem, and the metric
outbox_schema_problems says how many; `outbox migrate` puts things right, and `outbox check` fails
meanwhile."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

from processor.database import connect
from tests.acceptance.test_cli import outbox_cli
from tests.fix_database import subprocess_env
from tests.helpers import WorkerProcess, consumer_os_pid, wait_for

STANDBY_INTERVAL = 0.2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def schema_problems_metric(port: int) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("outbox_schema_problems "):
                return float(line.split()[1])
    return None


def noticed(port: int, text: str) -> float:
    """Wait until /health reports ``text``; return how long it took."""
    started = time.monotonic()
    wait_for(lambda: text in health(port)[1], timeout=20, what=f"/health to report {text!r}")
    return time.monotonic() - started


def test_a_running_worker_notices_the_triggers_and_migrate_restores_them(db, tmp_path):
    port = free_port()
    env = subprocess_env(db, OUTBOX_STANDBY_INTERVAL=str(STANDBY_INTERVAL))
    worker = WorkerProcess(env, tmp_path / "worker.log", "--metrics-port", str(port))
    took = {}
    try:
        with connect(db, application_name="operator") as conn:
            wait_for(lambda: consumer_os_pid(conn) == worker.pid, what="the worker to start")
            wait_for(lambda: health(port) == (200, "ok\n"), what="/health to answer ok")
            assert schema_problems_metric(port) == 0

            conn.execute("ALTER TABLE jobs_variants DISABLE TRIGGER outbox_capture_variant_update")
            took["disabled"] = noticed(port, "outbox_capture_variant_update on jobs_variants is disabled")
            assert health(port)[0] == 503 and schema_problems_metric(port) == 1
            check = outbox_cli("check", "--json", env=env)
            assert check.returncode == 1 and not json.loads(check.stdout)["ok"]

            conn.execute("DROP TRIGGER outbox_capture_variant_insert_delete ON jobs_variants")
            took["dropped"] = noticed(port, "outbox_capture_variant_insert_delete on jobs_variants is missing")
            assert schema_problems_metric(port) == 2

            restored = outbox_cli("migrate", env=env)
            assert restored.returncode == 0, restored.stderr
            assert "restored trigger outbox_capture_variant_update" in restored.stdout
            assert "restored trigger outbox_capture_variant_insert_delete" in restored.stdout
            wait_for(lambda: health(port) == (200, "ok\n"), timeout=20, what="/health to answer ok again")

            conn.execute(
                "CREATE FUNCTION sneaky() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "UPDATE ONLY jobs SET status = 'done' WHERE job_id = NEW.job_id; RETURN NULL; END $$;"
                "CREATE TRIGGER sneaky AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION sneaky()"
            )
            took["legacy trigger"] = noticed(port, "legacy trigger sneaky on jobs_variants writes job state")
            assert outbox_cli("check", env=env).returncode == 1
            assert "legacy trigger sneaky" in worker.output()  # logged
            assert "is disabled" in worker.output() and "is missing" in worker.output()
    finally:
        worker.kill()
    print(
        "\nschema problems noticed by a running worker (standby interval "
        f"{STANDBY_INTERVAL} s): " + ", ".join(f"{what} after {seconds:.2f} s" for what, seconds in took.items())
    )
