-- 0012: job transitions, appended with the job state under one ordering lock, and durable
-- subscriptions that follow them; holds stage their transition; the guard's token is processor:12.
--
-- Why: docs/decisions/0007-transitions-ordered-by-one-lock.md. Safe to run again (IF NOT EXISTS,
-- OR REPLACE).

CREATE TABLE IF NOT EXISTS outbox_job_transitions (
    transition_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id          uuid NOT NULL,
    partition       integer NOT NULL,
    -- NULL only where the row had none (an adopted table's NULL status).
    from_status     text,
    from_step       text,
    to_status       text NOT NULL,
    to_step         text,
    -- Who wrote the state: the processor (a batch or an operation), or a hold (outbox_hold_job).
    written_by      text NOT NULL CHECK (written_by IN ('processor', 'hold')),
    transitioned_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS outbox_job_transitions_job ON outbox_job_transitions (job_id, transition_id);

-- The lock that orders transitions (see above). Class: the product's advisory lock class
-- (processor.store.CONSUMER_LOCK_CLASS); -1 and -2 are migrate's and repartition's.
CREATE OR REPLACE FUNCTION outbox_transitions_lock() RETURNS boolean
LANGUAGE sql VOLATILE
AS $$ SELECT pg_advisory_xact_lock(185359889, -3) IS NOT NULL $$;

-- A subscription: a name and how far it acknowledged. to_statuses filters (NULL: every transition).
CREATE TABLE IF NOT EXISTS outbox_subscriptions (
    name            text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    position        bigint NOT NULL CHECK (position >= 0),
    to_statuses     text[] CHECK (to_statuses <@ ARRAY['queued', 'running', 'done', 'failed']),
    created_at      timestamptz NOT NULL DEFAULT now(),
    acknowledged_at timestamptz
);

-- Transitions a subscription's handler failed on: retried with backoff while parked_at is NULL
-- (the subscription waits at it, in order), then parked with the error once the attempts are
-- spent (the position moves past it; `outbox subscriptions parked|retry` show and redeliver).
CREATE TABLE IF NOT EXISTS outbox_subscription_failures (
    subscription  text NOT NULL REFERENCES outbox_subscriptions (name) ON DELETE CASCADE ON UPDATE CASCADE,
    transition_id bigint NOT NULL,
    attempts      integer NOT NULL,
    last_error    text NOT NULL,
    failed_at     timestamptz NOT NULL DEFAULT now(),
    parked_at     timestamptz,
    PRIMARY KEY (subscription, transition_id)
);

-- A hold's transition, staged by the application's transaction, published by the processor.
CREATE TABLE IF NOT EXISTS outbox_job_transitions_staged (
    staged_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id          uuid NOT NULL,
    from_status     text,
    from_step       text,
    to_status       text NOT NULL,
    to_step         text,
    transitioned_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Publishes the staged transitions, in the order they were staged; how many. Each statement of a
-- SQL function reads with a snapshot of its own: every hold committed before the call is seen.
CREATE OR REPLACE FUNCTION outbox_transitions_publish() RETURNS bigint
LANGUAGE sql VOLATILE
AS $$
    WITH staged AS (
        DELETE FROM outbox_job_transitions_staged
        WHERE outbox_transitions_lock()
        RETURNING *
    ), published AS (
        INSERT INTO outbox_job_transitions
            (job_id, partition, from_status, from_step, to_status, to_step, written_by, transitioned_at)
        SELECT job_id, outbox_partition_of(job_id), from_status, from_step, to_status, to_step, 'hold', transitioned_at
        FROM (SELECT * FROM staged ORDER BY staged_id) AS s
        RETURNING 1
    )
    SELECT count(*) FROM published
$$;

-- Holds stage their transition, so that each job's chain stays whole (a transition's "from" is
-- the previous one's "to"). Otherwise as in 0010.
CREATE OR REPLACE FUNCTION outbox_hold_job(p_job_id uuid, p_status text, p_step text, p_reason text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT
AS $$
DECLARE
    before record;
    after record;
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('queued', 'running', 'done', 'failed') THEN
        RAISE EXCEPTION 'a job''s status must be one of queued, running, done, failed (got %)',
            coalesce(quote_literal(p_status), 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF coalesce(p_reason, '') = '' THEN
        RAISE EXCEPTION 'a hold needs a reason' USING ERRCODE = 'check_violation';
    END IF;
    SELECT status::text AS status, current_step::text AS step INTO before
    FROM jobs WHERE job_id = p_job_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no job with id %', p_job_id USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO outbox_job_holds AS h (job_id, status, current_step, reason)
    VALUES (p_job_id, p_status, p_step, p_reason)
    ON CONFLICT (job_id) DO UPDATE
        SET status = excluded.status, current_step = excluded.current_step, reason = excluded.reason,
            held_at = now();
    PERFORM set_config('outbox.job_writer', 'hold', true);
    UPDATE jobs
    SET status = outbox_job_status(p_status), current_step = outbox_job_step(p_step), updated_at = now()
    WHERE job_id = p_job_id
    RETURNING status::text AS status, current_step::text AS step INTO after;
    PERFORM set_config('outbox.job_writer', '', true);
    IF (before.status, before.step) IS DISTINCT FROM (after.status, after.step) THEN
        INSERT INTO outbox_job_transitions_staged (job_id, from_status, from_step, to_status, to_step)
        VALUES (p_job_id, before.status, before.step, after.status, after.step);
    END IF;
END
$$;

-- The guard lets through only the processor that writes transitions (token processor:12).
CREATE OR REPLACE FUNCTION outbox_guard_job_state() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF OLD.status IS NOT DISTINCT FROM NEW.status AND OLD.current_step IS NOT DISTINCT FROM NEW.current_step THEN
        RETURN NULL;
    END IF;
    IF current_setting('outbox.job_writer', true) IN ('processor:12', 'hold') THEN
        RETURN NULL;
    END IF;
    IF current_setting('outbox.job_writer', true) = 'processor' THEN
        RAISE EXCEPTION 'this outbox worker is older than the database''s schema (migration 0012): upgrade it'
            USING ERRCODE = 'restrict_violation',
                  HINT = 'A worker must run the version that migrated the database: stop the old workers, start new ones.';
    END IF;
    RAISE EXCEPTION 'jobs.status and jobs.current_step of job % are written by the outbox processor only', OLD.job_id
        USING ERRCODE = 'restrict_violation',
              HINT = 'They follow the job''s variants: change jobs_variants instead. To set a job''s state '
                     'yourself (a cancel), hold it: SELECT outbox_hold_job(job_id, status, step, reason), '
                     'or outbox.hold_job() in Python. A trigger that writes job state from its variants is a '
                     'legacy one: drop it.';
END
$$;

DROP TRIGGER IF EXISTS outbox_guard_job_state ON jobs;
CREATE TRIGGER outbox_guard_job_state
    AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN (current_setting('outbox.job_writer', true) IS DISTINCT FROM 'processor:12')
    EXECUTE FUNCTION outbox_guard_job_state();
