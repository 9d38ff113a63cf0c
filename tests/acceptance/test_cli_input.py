"""Bad input to the command line: one clear line, the right exit code, nothing done."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

import outbox
from processor.database import connect
from tests.acceptance.test_cli import outbox_cli
from tests.fix_database import subprocess_env


def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ("run", "--until-idle", "--partition", "-1"),
        ("run", "--until-idle", "--batch-size", "100001"),
        ("run", "--until-idle", "--batch-size", "0"),
        ("backlog", "--partition", "-1"),
        ("replay", "--partition", "1024"),
        ("repartition", "0"),
    ],
)
def test_out_of_range_options_are_usage_errors(db, args):
    result = outbox_cli(*args, env=subprocess_env(db))
    assert result.returncode == 2, result.stderr
    line = one_line(result)
    assert "OUTBOX_" not in line.split(":")[0], line


def test_out_of_range_environment_values_are_usage_errors_naming_the_variable(db):
    result = outbox_cli("run", "--until-idle", env=subprocess_env(db, OUTBOX_PARTITION="-1"))
    assert result.returncode == 2
    assert "OUTBOX_PARTITION" in one_line(result)


def test_a_pipeline_step_too_long_for_an_event_is_refused_at_start(db):
    steps = f"ingest,{'x' * 250},iou_eval"
    result = outbox_cli("run", "--until-idle", env=subprocess_env(db, OUTBOX_PIPELINE_STEPS=steps))
    assert result.returncode != 0
    line = one_line(result)
    assert "OUTBOX_PIPELINE_STEPS" in line and "200" in line, line


def test_cross_field_setting_errors_name_the_variables(db):
    env = subprocess_env(db, OUTBOX_POLL_INTERVAL_MIN="1", OUTBOX_POLL_INTERVAL_MAX="0.5")
    line = one_line(outbox_cli("run", "--until-idle", env=env))
    assert "OUTBOX_SETTINGS" not in line
    assert "OUTBOX_POLL_INTERVAL_MIN" in line and "OUTBOX_POLL_INTERVAL_MAX" in line, line


def test_a_non_numeric_port_is_one_clear_line(db):
    url = "postgresql://postgres:secret@127.0.0.1:54x2/postgres"
    result = outbox_cli("backlog", env={**subprocess_env(db), "OUTBOX_DATABASE_URL": url})
    assert result.returncode != 0
    line = one_line(result)
    assert "invalid literal" not in line and "port" in line and "secret" not in line, line


def test_replay_of_an_unknown_job_says_so_and_replays_nothing(db, engine):
    with engine.begin() as sa:
        known, _ = outbox.create_job(sa, variants=1)
    env = subprocess_env(db)
    assert outbox_cli("run", "--until-idle", env=env).returncode == 0
    unknown = uuid.uuid4()
    result = outbox_cli("replay", "--job", str(unknown), env=env)
    assert result.returncode == 1
    assert str(unknown) in one_line(result) and "replayed 1" not in result.stdout
    mixed = outbox_cli("replay", "--job", str(unknown), "--job", str(known), env=env)
    assert mixed.returncode == 1 and "replayed" not in mixed.stdout


def test_repartition_timeout_bounds_how_long_writers_wait(db, engine):
    """A transaction that wrote an event and stays open: the repartition gives up within its timeout,
    and a writer that arrived meanwhile waited no longer than that (plus a margin for a loaded host)."""
    env = subprocess_env(db)
    with engine.begin() as sa:
        _, (variant,) = outbox.create_job(sa, variants=1)
    timeout = 2.0
    with connect(db, application_name="long-writer", autocommit=False) as long_tx:
        long_tx.execute("UPDATE jobs_variants SET status = 'running' WHERE job_variants_id = %s", [variant])
        waited: list[float] = []

        def late_writer() -> None:
            time.sleep(0.5)  # arrives while the repartition waits (not ordering a race: any arrival works)
            with engine.begin() as sa:
                started = time.monotonic()
                outbox.create_job(sa, variants=1)
                waited.append(time.monotonic() - started)

        writer = threading.Thread(target=late_writer)
        writer.start()
        started = time.monotonic()
        result = outbox_cli("repartition", "2", "--timeout", str(timeout), env=env)
        elapsed = time.monotonic() - started
        writer.join(timeout=60)
        long_tx.rollback()
    assert result.returncode == 1, result.stderr
    assert "nothing was changed" in one_line(result)
    assert elapsed < timeout + 3, f"repartition took {elapsed:.1f} s with --timeout {timeout}"
    assert waited and waited[0] < timeout + 2, f"a writer waited {waited[0]:.1f} s with --timeout {timeout}"


@pytest.mark.parametrize("driver", ["+asyncpg", "+psycopg2"])
def test_the_applications_own_url_works_for_the_commands(db, engine, driver):
    """A service's postgresql+asyncpg:// (or +psycopg2) URL, as it has it: the product connects with psycopg."""
    with engine.begin() as sa:
        outbox.create_job(sa, variants=2)
    url = db.url.set(drivername=f"postgresql{driver}").render_as_string(hide_password=False)
    env = {**subprocess_env(db), "OUTBOX_DATABASE_URL": url + "?ssl=disable" * (driver == "+asyncpg")}
    for args in (("migrate",), ("run", "--until-idle"), ("backlog", "--json"), ("verify",)):
        result = outbox_cli(*args, env=env)
        assert result.returncode == 0, (args, result.stderr)
    assert '"pending_events": 0' in outbox_cli("backlog", "--json", env=env).stdout
