"""The application's own triggers and functions change variants again inside the writer's transaction.

Whatever their names, number and kind, the processor must end with each variant's state as the
row has it once the transaction commits: the events of one variant are ordered by version, so the
newest version must carry the last change the row took. Each case installs its triggers, runs
writes that fire them, and compares the stored variant states with jobs_variants and the jobs with
the SQL reference.
"""

from __future__ import annotations

import uuid

import pytest

import outbox
from tests.helpers import AUTO_ADVANCE, drain
from tests.reference import actual_job_states, reference_job_states

STEPS = ("ingest", "detect", "segment", "iou_eval")

CASES = {
    # The case that was seen: sorted before the product's trigger, and after it.
    "auto-advance sorted first": AUTO_ADVANCE
    + "CREATE TRIGGER a_auto_advance AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION app_auto_advance();",
    "auto-advance sorted last": AUTO_ADVANCE
    + "CREATE TRIGGER zz_auto_advance AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION app_auto_advance();",
    # Two of them, on INSERT too (a variant inserted done is advanced at once).
    "auto-advance twice, on insert and update": AUTO_ADVANCE
    + "CREATE TRIGGER a1 AFTER INSERT OR UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION app_auto_advance();"
    + "CREATE TRIGGER a2 AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION app_auto_advance();",
    # A row trigger that changes the row's siblings, which the same statement already changed.
    "sibling failure": """
        CREATE FUNCTION app_fail_siblings() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.status = 'failed' AND OLD.status <> 'failed' THEN
                UPDATE jobs_variants SET status = 'failed'
                WHERE job_id = NEW.job_id AND job_variants_id <> NEW.job_variants_id AND status <> 'failed';
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER a_fail_siblings AFTER UPDATE ON jobs_variants
            FOR EACH ROW EXECUTE FUNCTION app_fail_siblings();
    """,
    # A statement trigger that stamps every variant of the statement's jobs.
    "statement trigger": """
        CREATE FUNCTION app_requeue_done_at_detect() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF pg_trigger_depth() = 1 THEN  -- not again for its own UPDATE
                UPDATE jobs_variants SET status = 'queued', current_step = 'segment'
                WHERE status = 'done' AND current_step = 'detect';
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER a_requeue AFTER UPDATE ON jobs_variants
            FOR EACH STATEMENT EXECUTE FUNCTION app_requeue_done_at_detect();
    """,
    # Another table's trigger writes variants (a command queue), then the writer's own update follows.
    "trigger on another table": AUTO_ADVANCE
    + """
        CREATE TABLE app_commands (variant_id uuid, status text, step text);
        CREATE FUNCTION app_apply_command() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE jobs_variants SET status = NEW.status, current_step = NEW.step
            WHERE job_variants_id = NEW.variant_id;
            RETURN NULL;
        END $$;
        CREATE TRIGGER a_apply AFTER INSERT ON app_commands FOR EACH ROW EXECUTE FUNCTION app_apply_command();
        CREATE TRIGGER a_auto_advance AFTER UPDATE ON jobs_variants FOR EACH ROW EXECUTE FUNCTION app_auto_advance();
    """,
    # Not triggers: functions called from the writer's own statement change the row again (the
    # writes below call them when they exist; see FUNCTION_WRITES).
    "functions in the statement": """
        CREATE FUNCTION app_advance(p_id uuid) RETURNS int LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE jobs_variants SET status = 'queued', current_step = 'segment' WHERE job_variants_id = p_id;
            RETURN 1;
        END $$;
        CREATE FUNCTION app_fail_other(p_other uuid) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE jobs_variants SET status = 'failed' WHERE job_variants_id = p_other;
            RETURN 'running';
        END $$;
        CREATE FUNCTION app_reinsert(p_id uuid, p_job uuid) RETURNS int LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step)
            VALUES (p_id, p_job, 'queued', 'segment');
            RETURN 1;
        END $$;
    """,
    # A deferred constraint trigger that re-queues at commit.
    "deferred constraint trigger": AUTO_ADVANCE
    + """
        CREATE CONSTRAINT TRIGGER a_auto_advance AFTER UPDATE ON jobs_variants
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION app_auto_advance();
    """,
}


def function_writes(conn, variants, index: int) -> None:
    """The writer's statements call functions that change a row the statement changed (by turns)."""
    first, _, third = variants
    kind = index % 4
    if kind == 0:  # RETURNING changes the same row again
        conn.execute(
            "UPDATE jobs_variants SET status = 'done', current_step = 'detect' WHERE job_variants_id = %s"
            " RETURNING app_advance(job_variants_id)",
            [third],
        )
    elif kind == 1:  # the outer query of a data-modifying CTE does
        conn.execute(
            "WITH x AS (UPDATE jobs_variants SET status = 'done', current_step = 'detect' WHERE job_variants_id = %s"
            " RETURNING job_variants_id) SELECT app_advance(job_variants_id) FROM x",
            [third],
        )
    elif kind == 2:  # a delete whose RETURNING puts the row back
        conn.execute(
            "DELETE FROM jobs_variants WHERE job_variants_id = %s RETURNING app_reinsert(job_variants_id, job_id)",
            [third],
        )
    else:  # the SET expression of one row changes another row the same statement changed first
        job = conn.execute("SELECT job_id FROM jobs_variants WHERE job_variants_id = %s", [first]).fetchone()[0]
        earlier, later = uuid.uuid4(), uuid.uuid4()
        conn.execute(  # inserted together: in a sequential scan, earlier comes first
            "INSERT INTO jobs_variants (job_variants_id, job_id, status) VALUES (%s, %s, 'queued'), (%s, %s, 'queued')",
            [earlier, job, later, job],
        )
        conn.execute("SET LOCAL enable_indexscan = off")
        conn.execute("SET LOCAL enable_bitmapscan = off")
        conn.execute(
            "UPDATE jobs_variants SET status = CASE WHEN job_variants_id = %(later)s"
            " THEN app_fail_other(%(earlier)s) ELSE 'running' END WHERE job_variants_id IN (%(earlier)s, %(later)s)",
            {"earlier": earlier, "later": later},
        )


def stored_states(conn) -> dict:
    rows = conn.execute("SELECT variant_id, job_id, status, step FROM outbox_variant_states WHERE NOT removed")
    return {row[0]: tuple(row[1:]) for row in rows}


def rows(conn) -> dict:
    found = conn.execute("SELECT job_variants_id, job_id, status, current_step FROM jobs_variants")
    return {row[0]: tuple(row[1:]) for row in found}


@pytest.mark.parametrize("case", list(CASES))
def test_the_newest_event_of_a_variant_carries_its_row_as_committed(case, conn, engine, settings):
    conn.execute(CASES[case])
    jobs = {}
    with engine.begin() as sa:
        for _ in range(20):
            job, variants = outbox.create_job(sa, variants=3)
            jobs[job] = variants
    drain(settings)

    for index, variants in enumerate(jobs.values()):
        with conn.transaction():
            # One statement for two variants, then one for the third: done at a step that is not final,
            # failed, or done at the final step, by turns.
            status = ("done", "failed", "done")[index % 3]
            step = ("detect", "segment", "iou_eval")[index % 3]
            conn.execute(
                "UPDATE jobs_variants SET status = %s, current_step = %s WHERE job_variants_id = ANY(%s)",
                [status, step, variants[:2]],
            )
            if case == "trigger on another table":
                conn.execute("INSERT INTO app_commands VALUES (%s, 'done', 'detect')", [variants[2]])
            elif case == "functions in the statement":
                function_writes(conn, variants, index)
            else:
                conn.execute(
                    "UPDATE jobs_variants SET status = 'done', current_step = 'detect' WHERE job_variants_id = %s",
                    [variants[2]],
                )
    with engine.begin() as sa:  # a variant inserted done at a step that is not the last
        job = next(iter(jobs))
        sa.exec_driver_sql(
            "INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step) "
            "VALUES (gen_random_uuid(), %s, 'done', 'ingest')",
            (job,),
        )
    drain(settings)

    wrong = {v: (stored_states(conn).get(v), row) for v, row in rows(conn).items() if stored_states(conn).get(v) != row}
    assert not wrong, f"{len(wrong)} of {len(rows(conn))} variants: (stored, row) {list(wrong.values())[:3]}"
    expected = reference_job_states(conn, STEPS)
    actual = actual_job_states(conn)
    wrong_jobs = [job for job in expected if actual.get(job) != expected[job]]
    assert not wrong_jobs, f"{len(wrong_jobs)} of {len(expected)} jobs differ from the reference"
