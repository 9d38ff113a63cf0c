"""A job row locked by the application holds back that job only, never its partition."""

from __future__ import annotations

import logging
import threading

import outbox
from processor.database import connect
from processor.worker import Worker
from tests.fix_database import make_settings
from tests.helpers import job_state, pending_work, wait_for
from tests.reference import actual_job_states, reference_job_states

STEPS = ("ingest", "detect", "segment", "iou_eval")


def test_a_locked_job_row_holds_back_only_its_job_and_is_applied_when_the_lock_goes(db, conn, engine, caplog):
    settings = make_settings(db, statement_timeout=5)
    jobs = []
    with engine.begin() as sa:
        for _ in range(200):
            job, variants = outbox.create_job(sa, variants=2)
            jobs.append((job, variants))
    locked_job = jobs[0][0]
    worker = Worker(settings, db)
    thread = threading.Thread(target=worker.run)
    caplog.set_level(logging.WARNING, logger="processor")
    thread.start()
    try:
        wait_for(lambda: pending_work(conn) == 0, what="the worker to apply the new jobs")
        before = job_state(conn, locked_job)
        with connect(db, application_name="support-console", autocommit=False) as holder:
            holder.execute("SELECT * FROM jobs WHERE job_id = %s FOR UPDATE", [locked_job])
            holder_pid = holder.info.backend_pid
            with engine.begin() as sa:
                for _, variants in jobs:
                    for variant in variants:
                        outbox.update_variant(sa, variant, status="done", step="iou_eval")
            others = [job for job, _ in jobs[1:]]
            # Every other job flows while the one row stays locked (within the statement timeout).
            wait_for(
                lambda: all(job_state(conn, job) == ("done", "iou_eval") for job in others),
                timeout=4,
                what="the 199 other jobs to be applied",
            )
            assert job_state(conn, locked_job) == before
            logged = wait_for(
                lambda: [r.getMessage() for r in caplog.records if str(locked_job) in r.getMessage()],
                what="a log line about the locked job",
            )
            assert str(holder_pid) in logged[0] and "support-console" in logged[0], logged[0]
            assert worker.connected.is_set() and "database unavailable" not in caplog.text
            holder.rollback()
        wait_for(lambda: job_state(conn, locked_job) == ("done", "iou_eval"), what="the job once its lock went")
        wait_for(lambda: pending_work(conn) == 0, what="nothing left to do")
        assert actual_job_states(conn) == reference_job_states(conn, STEPS)
    finally:
        worker.stop()
        thread.join(timeout=30)
