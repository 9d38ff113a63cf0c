"""One active worker at a time; a standby takes over when the active one is killed."""

from __future__ import annotations

import signal
import time

from processor.database import connect
from tests.fix_database import subprocess_env
from tests.helpers import JOB_WRITES_AUDIT, WorkerProcess, assert_only_worker_applies, consumer_os_pid, wait_for


def test_only_one_worker_applies_and_the_standby_takes_over_after_a_kill(db, engine, tmp_path):
    env = subprocess_env(db, OUTBOX_STANDBY_INTERVAL="0.1")
    with connect(db, application_name="observer") as conn:
        conn.execute(JOB_WRITES_AUDIT)
        first = WorkerProcess(env, tmp_path / "first.log")
        second = None
        try:
            wait_for(lambda: consumer_os_pid(conn) == first.pid, what="the first worker to take the lock")
            second = WorkerProcess(env, tmp_path / "second.log")
            wait_for(lambda: "standby" in second.output(), what="the second worker to stand by")

            assert_only_worker_applies(conn, engine, first, done_jobs=20)

            first.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            first.wait()
            wait_for(lambda: consumer_os_pid(conn) == second.pid, what="the standby to take over")
            takeover = time.monotonic() - killed_at

            assert_only_worker_applies(conn, engine, second, done_jobs=40)
            print(f"\nstandby took over {takeover:.2f} s after SIGKILL of the active worker")
        finally:
            first.kill()
            if second is not None:
                second.signal(signal.SIGTERM)
                assert second.wait(timeout=30) == 0
