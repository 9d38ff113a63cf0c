-- 0011: the guard of job state becomes an AFTER ROW trigger with no column list, so that it sees the
-- row as written and leaves the columns' types free to change.
--
-- Why: docs/decisions/0008-job-state-has-one-writer.md.
DROP TRIGGER IF EXISTS outbox_guard_job_state ON jobs;

CREATE OR REPLACE FUNCTION outbox_guard_job_state() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF OLD.status IS NOT DISTINCT FROM NEW.status AND OLD.current_step IS NOT DISTINCT FROM NEW.current_step THEN
        RETURN NULL;
    END IF;
    IF current_setting('outbox.job_writer', true) IN ('processor', 'hold') THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'jobs.status and jobs.current_step of job % are written by the outbox processor only', OLD.job_id
        USING ERRCODE = 'restrict_violation',
              HINT = 'They follow the job''s variants: change jobs_variants instead. To set a job''s state '
                     'yourself (a cancel), hold it: SELECT outbox_hold_job(job_id, status, step, reason), '
                     'or outbox.hold_job() in Python. A trigger that writes job state from its variants is a '
                     'legacy one: drop it.';
END
$$;

CREATE TRIGGER outbox_guard_job_state
    AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN (current_setting('outbox.job_writer', true) IS DISTINCT FROM 'processor')
    EXECUTE FUNCTION outbox_guard_job_state();
