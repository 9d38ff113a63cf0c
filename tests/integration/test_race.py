"""The original bug, reproduced deterministically, and the same interleaving with the product."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

from processor.database import connect
from processor.fold import Pipeline
from processor.migrate import migrate
from tests.fix_database import TEST_STEPS, make_settings
from tests.helpers import drain, job_state, wait_for, waiting_on_lock

LEGACY_SCHEMA = (Path(__file__).parents[1] / "sql" / "legacy_schema.sql").read_text()
FINISH = "UPDATE jobs_variants SET status = 'done', current_step = 'iou_eval' WHERE job_variants_id = %s"


def make_job_with_two_running_variants(conn) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    job, v1, v2 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    conn.execute("INSERT INTO jobs (job_id, status, current_step) VALUES (%s, 'running', 'iou_eval')", [job])
    for variant in (v1, v2):
        conn.execute(
            "INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step) "
            "VALUES (%s, %s, 'running', 'iou_eval')",
            [variant, job],
        )
    return job, v1, v2


def finish_last_two_variants_concurrently(db, observer, v1, v2) -> None:
    """Two transactions each finish one of the last two variants; both are open before either commits.

    With the legacy trigger, B's trigger counts while A is uncommitted, then blocks on the jobs row
    that A's trigger updated; we wait until B is blocked (so its count is taken), then commit A.
    """
    with (
        connect(db, application_name="writer-a", autocommit=False) as a,
        connect(db, application_name="writer-b", autocommit=False) as b,
    ):
        a.execute(FINISH, [v1])
        b_pid = b.info.backend_pid
        errors: list[BaseException] = []

        def finish_b() -> None:
            try:
                b.execute(FINISH, [v2])
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=finish_b)
        thread.start()
        # Either B blocks on A's lock on the jobs row (legacy trigger) or its statement completes.
        wait_for(lambda: waiting_on_lock(observer, b_pid) or not thread.is_alive(), what="writer B's update")
        a.commit()
        thread.join()
        assert not errors
        b.commit()


def test_the_legacy_trigger_leaves_the_job_running_and_the_product_finishes_it(empty_db):
    with connect(empty_db, application_name="setup") as conn:
        conn.execute(LEGACY_SCHEMA.encode())
        job, v1, v2 = make_job_with_two_running_variants(conn)

        finish_last_two_variants_concurrently(empty_db, conn, v1, v2)

        # The bug: every variant is done at the final step, the job is not.
        assert conn.execute("SELECT array_agg(DISTINCT status) FROM jobs_variants").fetchone()[0] == ["done"]
        assert job_state(conn, job) == ("running", "iou_eval")

        # Adopting the product on this database removes the trigger and repairs the stuck job.
        report = migrate(conn, pipeline=Pipeline(TEST_STEPS))
        assert [(t.trigger, t.function) for t in report.removed_triggers] == [
            ("check_all_variants_done_trigger", "check_all_variants_done()")
        ]
        settings = make_settings(empty_db)
        drain(settings)
        assert job_state(conn, job) == ("done", "iou_eval")

        # The same interleaving with the product installed ends done.
        job2, w1, w2 = make_job_with_two_running_variants(conn)
        finish_last_two_variants_concurrently(empty_db, conn, w1, w2)
        drain(settings)
        assert job_state(conn, job2) == ("done", "iou_eval")


def test_the_same_interleaving_on_a_fresh_install_ends_done(db, settings):
    with connect(db, application_name="setup") as conn:
        job, v1, v2 = make_job_with_two_running_variants(conn)
        drain(settings)
        assert job_state(conn, job) == ("running", "iou_eval")
        finish_last_two_variants_concurrently(db, conn, v1, v2)
        drain(settings)
        assert job_state(conn, job) == ("done", "iou_eval")
