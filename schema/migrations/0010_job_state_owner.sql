-- 0010: job state has one writer: a guard refuses any other write of jobs.status and
-- jobs.current_step, holds let the application set a job's state itself, and cast functions follow
-- the application's column types.
--
-- Why: docs/decisions/0008-job-state-has-one-writer.md.

-- 1. Job state belongs to the processor. A change of jobs.status or jobs.current_step by anything
-- else (the legacy aggregation trigger in any form, a helper it calls, a support tool's UPDATE,
-- an INSERT ... ON CONFLICT DO UPDATE) would be undone silently by the next fold of the job; it is
-- refused instead, in the transaction that tries it, with the way to do it. The processor's own
-- writes (the query jobs_write) and holds (outbox_hold_job) say who they are in a setting local to
-- their transaction. Inserting a job, and any other column, stay the application's.
CREATE FUNCTION outbox_guard_job_state() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF current_setting('outbox.job_writer', true) IN ('processor', 'hold') THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'jobs.status and jobs.current_step of job % are written by the outbox processor only', OLD.job_id
        USING ERRCODE = 'restrict_violation',
              HINT = 'They follow the job''s variants: change jobs_variants instead. To set a job''s state '
                     'yourself (a cancel), hold it: SELECT outbox_hold_job(job_id, status, step, reason), '
                     'or outbox.hold_job() in Python. A trigger that writes job state from its variants is a '
                     'legacy one: drop it.';
END
$$;

-- OF: fires only for UPDATEs that name one of the two columns; WHEN: only when one changes.
CREATE TRIGGER outbox_guard_job_state
    BEFORE UPDATE OF status, current_step ON jobs
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.current_step IS DISTINCT FROM NEW.current_step)
    EXECUTE FUNCTION outbox_guard_job_state();

-- 2. Holds: a job whose state the application sets itself (a support "cancel"). The processor
-- leaves a held job's row alone (jobs_write skips it) until the hold is released, and then folds
-- it from its variants again. Written through the two functions below, which run with the
-- owner's rights, so that the writer role needs no right on the columns the processor owns.
CREATE TABLE outbox_job_holds (
    job_id       uuid PRIMARY KEY,
    status       text NOT NULL,
    current_step text,
    reason       text NOT NULL,
    held_at      timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION outbox_hold_job(p_job_id uuid, p_status text, p_step text, p_reason text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT
AS $$
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('queued', 'running', 'done', 'failed') THEN
        RAISE EXCEPTION 'a job''s status must be one of queued, running, done, failed (got %)',
            coalesce(quote_literal(p_status), 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF coalesce(p_reason, '') = '' THEN
        RAISE EXCEPTION 'a hold needs a reason' USING ERRCODE = 'check_violation';
    END IF;
    INSERT INTO outbox_job_holds AS h (job_id, status, current_step, reason)
    VALUES (p_job_id, p_status, p_step, p_reason)
    ON CONFLICT (job_id) DO UPDATE
        SET status = excluded.status, current_step = excluded.current_step, reason = excluded.reason,
            held_at = now();
    PERFORM set_config('outbox.job_writer', 'hold', true);
    UPDATE jobs
    SET status = outbox_job_status(p_status), current_step = outbox_job_step(p_step), updated_at = now()
    WHERE job_id = p_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no job with id %', p_job_id USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM set_config('outbox.job_writer', '', true);
END
$$;

-- Release: the job goes back to the processor, which folds it from its variants again.
CREATE FUNCTION outbox_release_job(p_job_id uuid) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT
AS $$
BEGIN
    DELETE FROM outbox_job_holds WHERE job_id = p_job_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO outbox_dirty_jobs (partition, job_id) VALUES (outbox_partition_of(p_job_id), p_job_id)
    ON CONFLICT (partition, job_id) DO UPDATE SET retry_at = NULL;
    RETURN true;
END
$$;

-- The casts of the application's column types, as text until `outbox migrate` writes them for the
-- actual columns (an enum, a domain, varchar(n)): the statements that write those columns call
-- them. Inlined by the planner (single-expression SQL functions).
CREATE FUNCTION outbox_job_status(p text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT p $$;
CREATE FUNCTION outbox_job_step(p text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT p $$;
CREATE FUNCTION outbox_variant_status(p text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT p $$;
CREATE FUNCTION outbox_variant_step(p text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT p $$;
