"""The worker embedded in an asyncio application (tests/reliability/app_process.py) and an `outbox run`
process share one database under writers: each takes over when the other is SIGKILLed.

The audit triggers of tests/reliability/fleet.py watch from inside the database: every checkpoint
move was made under the partition's consumer lock, the moves chain, and every event was applied
exactly once; job state ends equal to the independent reference (tests/reference.py), with no dead
letter and no flagged job.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import WorkerProcess, make_jobs, pending_work, wait_for
from tests.reliability.fleet import (
    ROOT,
    Writers,
    backend_of,
    check_audit,
    check_final_state,
    events_applied,
    fleet,
    install_audits,
    owners,
    repartition_now,
    worker_env,
)

__all__ = ["fleet"]  # the fixture


class AppProcess(WorkerProcess):
    """The asyncio application of app_process.py (same interface as an `outbox run` WorkerProcess)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.app_process"],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[list[AppProcess]]:
    started: list[AppProcess] = []
    yield started
    for app in started:
        app.kill()


def test_an_application_and_an_outbox_run_standby_take_over_from_each_other_when_killed(
    db, conn, engine, fleet, apps, tmp_path, capsys
):
    rng = random.Random(11)
    install_audits(conn)
    repartition_now(db, 2)  # the audit counts from a repartition; then one partition: one active, one standby
    repartition_now(db, 1)
    jobs = make_jobs(engine, 100, rng)
    env = worker_env(db, OUTBOX_BATCH_SIZE="50")

    def start_app(name: str) -> AppProcess:
        app = AppProcess(env, tmp_path / f"{name}.log")
        apps.append(app)
        return app

    def applying(what: str) -> None:
        mark = events_applied(conn)
        wait_for(lambda: events_applied(conn) >= mark + 300, timeout=60, what=what)

    first_app = start_app("app-1")
    wait_for(lambda: owners(conn).get(0) == first_app.pid, timeout=60, what="the application's worker to be active")
    wait_for(lambda: "health: active partitions=0 ok=True" in first_app.output(), what="the application's health")
    run = fleet(env, "outbox-run")
    wait_for(lambda: "standby: no partition free" in run.output(), timeout=60, what="`outbox run` to stand by")
    takeovers = []
    with Writers(db, engine, jobs, seed=rng.random()) as writers:
        applying("the application's worker to apply events")
        killed = time.monotonic()
        first_app.signal(signal.SIGKILL)
        wait_for(lambda: owners(conn).get(0) == run.pid, timeout=30, what="`outbox run` to take over")
        takeovers.append(time.monotonic() - killed)
        assert first_app.wait() == -signal.SIGKILL
        applying("`outbox run` to apply events")

        second_app = start_app("app-2")
        wait_for(lambda: backend_of(conn, "worker", second_app.pid), timeout=60, what="the application to connect")
        wait_for(lambda: "health: standby partitions=- ok=True" in second_app.output(), what="a standby's health")
        assert owners(conn).get(0) == run.pid
        killed = time.monotonic()
        run.signal(signal.SIGKILL)
        wait_for(lambda: owners(conn).get(0) == second_app.pid, timeout=30, what="the application to take over")
        takeovers.append(time.monotonic() - killed)
        assert run.wait() == -signal.SIGKILL
        wait_for(lambda: "health: active partitions=0 ok=True" in second_app.output(), what="the active health")
        applying("the second application's worker to apply events")
        writers.stop()
    writers.check()
    wait_for(lambda: pending_work(conn) == 0, timeout=120, what="the application's worker to drain")

    # SIGTERM: the application cancels the worker's task; it stops cleanly and the process exits 0.
    second_app.signal(signal.SIGTERM)
    assert second_app.wait(timeout=30) == 0, second_app.output()[-3000:]
    assert "worker stopped: stopped" in second_app.output()
    assert owners(conn) == {}

    jobs_total, jobs_done = check_final_state(conn, 1)
    report = check_audit(conn)
    # Each of the three workers applied events: the killed ones too.
    assert {int(app.rsplit(":", 1)[1]) for app in report.by_worker} == {first_app.pid, run.pid, second_app.pid}
    with capsys.disabled():
        print(
            f"\nembedded worker and `outbox run`: {writers.summary()}; takeover after SIGKILL: application -> "
            f"`outbox run` {takeovers[0]:.3f} s, `outbox run` -> application {takeovers[1]:.3f} s; {jobs_total} jobs "
            f"({jobs_done} done) equal to the reference\n  audit: {report}"
        )
