"""A rolling upgrade: `outbox migrate` applies a newer migration while a worker of the older version
runs, under writers; the old worker reconnects across it and keeps applying events, then a new
worker takes over. Every event is applied exactly once (the fleet's audit) and job state ends equal
to the reference.

The newer version is made up for the test: a copy of the source tree (processor/, outbox/, schema/)
plus a synthetic migration after the last one in the copy's schema/migrations; the new `outbox
migrate` and the new worker run that copy (PYTHONPATH, and PYTHONSAFEPATH so that the working
directory's packages do not come first), whose version is its own package's newest migration. With
``-- Serves workers from:`` at the old version, the old worker goes on across a reconnect; at the
new version, the old worker, still connected, stops at its next periodic check with one line saying
to upgrade it, and the new worker applies what it left.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from processor.migrate import latest_version
from processor.workload import ChurnWriters
from tests.fix_database import subprocess_env
from tests.helpers import make_jobs, pending_work, wait_for
from tests.reliability.fleet import (
    ROOT,
    backend_of,
    check_audit,
    check_final_state,
    covered,
    events_applied,
    fleet,
    install_audits,
    repartition_now,
    stop_cleanly,
    worker_env,
)

__all__ = ["fleet"]  # the fixture

OLD = latest_version()
NEW = OLD + 1
PARTITIONS = 2  # the old and the new worker share them while both run


def newer_version(tmp_path: Path, serves_workers_from: int) -> Path:
    """A copy of the source tree whose schema/ has a synthetic migration NEW serving workers from
    ``serves_workers_from`` on: the next version of the same code."""
    tree = tmp_path / "new_version"
    for package in ("processor", "outbox", "schema"):
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "schema" / "migrations" / f"{NEW:04d}_rolling_upgrade_probe.sql").write_text(
        f"-- {NEW:04d}: a synthetic migration of tests/reliability/test_rolling_upgrade.py: one new function.\n"
        "--\n"
        f"-- Serves workers from: {serves_workers_from}\n\n"
        "CREATE FUNCTION outbox_rolling_upgrade_probe() RETURNS integer LANGUAGE sql IMMUTABLE AS $$ SELECT 1 $$;\n",
        encoding="utf-8",
    )
    version = subprocess.run(
        [sys.executable, "-c", "from processor.migrate import latest_version; print(latest_version())"],
        env=run_from(tree, {}),
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip() == str(NEW)  # the copy is what runs, at its own version
    return tree


def run_from(tree: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` for a process that imports the code of ``tree``, not this checkout's."""
    return {**env, "PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}


def migrate_to(db: Any, tree: Path) -> str:
    """`outbox migrate` of the newer version, as a process; its output."""
    done = subprocess.run(
        [sys.executable, "-m", "processor.cli", "migrate"],
        env=run_from(tree, subprocess_env(db)),
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def cut_sessions(conn: psycopg.Connection[Any], pid: int) -> list[int]:
    """Terminate every session of the `outbox` process ``pid``: it must reconnect."""
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid), pid FROM pg_stat_activity WHERE application_name LIKE %s",
        [f"outbox-%:%:{pid}"],
    ).fetchall()
    assert rows, f"process {pid} has no session"
    return [row[1] for row in rows]


def applies_more(conn: psycopg.Connection[Any], count: int, what: str) -> None:
    mark = events_applied(conn)
    wait_for(lambda: events_applied(conn) >= mark + count, timeout=60, what=what)


def test_an_old_worker_keeps_applying_across_a_migration_that_serves_it(db, conn, engine, fleet, tmp_path):
    install_audits(conn)
    repartition_now(db, PARTITIONS)  # the audit's chains start at a repartition
    tree = newer_version(tmp_path, serves_workers_from=OLD)
    jobs = make_jobs(engine, 60, random.Random(17))
    old = fleet(worker_env(db, OUTBOX_BATCH_SIZE="16"), "old")
    with ChurnWriters(db, engine, jobs, seed=17, pause=0.002) as writers:
        applies_more(conn, 100, "the old worker to apply events")

        output = migrate_to(db, tree)
        assert f"{NEW:04d}_rolling_upgrade_probe" in output
        cut = cut_sessions(conn, old.pid)
        wait_for(
            lambda: backend_of(conn, "worker", old.pid) not in (None, *cut), timeout=30, what="the old worker back"
        )
        applies_more(conn, 100, "the old worker to apply events on the newer schema")

        new = fleet(run_from(tree, worker_env(db, OUTBOX_BATCH_SIZE="16")), "new")
        wait_for(lambda: backend_of(conn, "worker", new.pid), timeout=60, what="the new worker to connect")
        stop_cleanly(old)
        wait_for(lambda: covered(conn, {new.pid}, PARTITIONS), timeout=30, what="the new worker to take over")
        applies_more(conn, 100, "the new worker to apply events")
        writers.stop()
    writers.check()
    wait_for(lambda: pending_work(conn) == 0, timeout=120, what="the new worker to drain")

    assert "database unavailable" in old.output()  # it did reconnect, and was not refused
    assert "upgrade the worker" not in old.output()
    check_final_state(conn, PARTITIONS)
    report = check_audit(conn)
    assert {int(app.rsplit(":", 1)[1]) for app in report.by_worker} == {old.pid, new.pid}
    stop_cleanly(new)


def test_an_old_worker_stops_with_one_line_when_a_migration_no_longer_serves_it(db, conn, engine, fleet, tmp_path):
    install_audits(conn)
    repartition_now(db, PARTITIONS)  # the audit's chains start at a repartition
    tree = newer_version(tmp_path, serves_workers_from=NEW)
    jobs = make_jobs(engine, 60, random.Random(18))
    old = fleet(worker_env(db, OUTBOX_BATCH_SIZE="16"), "old")
    with ChurnWriters(db, engine, jobs, seed=18, pause=0.002) as writers:
        applies_more(conn, 100, "the old worker to apply events")

        # Its connection is left alone: its next periodic check of the window (every standby
        # interval) stops it, before any call of a function the new version may have dropped.
        migrate_to(db, tree)
        assert old.wait(timeout=60) == 1
        last = old.output().strip().splitlines()[-1]
        assert last == (
            f"error: the outbox schema is at version {NEW}, newer than this worker knows ({OLD}), and serves "
            f"workers of version {NEW} and newer: upgrade the worker"
        ), old.output()[-3000:]

        new = fleet(run_from(tree, worker_env(db, OUTBOX_BATCH_SIZE="16")), "new")
        wait_for(lambda: covered(conn, {new.pid}, PARTITIONS), timeout=60, what="the new worker to take over")
        applies_more(conn, 100, "the new worker to apply events")
        writers.stop()
    writers.check()
    wait_for(lambda: pending_work(conn) == 0, timeout=120, what="the new worker to drain")

    # Nothing the old worker left is lost: every event applied once, job state as the reference says.
    check_final_state(conn, PARTITIONS)
    report = check_audit(conn)
    assert {int(app.rsplit(":", 1)[1]) for app in report.by_worker} == {old.pid, new.pid}
    stop_cleanly(new)
