-- 0013: trace context: an event carries its writer's trace context (outbox.traceparent), a job
-- transition that of the event that caused it; the guard's token is processor:13.
--
-- Why and the figures (+2.2% of a writer transaction): docs/decisions/0009-trace-context-in-events.md.
-- Safe to run again (IF NOT EXISTS, OR REPLACE).

ALTER TABLE outbox_events ADD COLUMN IF NOT EXISTS trace_parent text;
ALTER TABLE outbox_job_transitions ADD COLUMN IF NOT EXISTS trace_parent text;

-- As in 0005, with the writer's trace context.
CREATE OR REPLACE FUNCTION outbox_append_variant_event(
    p_event_type text, p_job_id uuid, p_variant_id uuid, p_status text, p_step text
) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO outbox_events
        (event_type, schema_version, partition, job_id, variant_id, variant_version, payload, trace_parent)
    VALUES (
        p_event_type, 1, outbox_partition_of(p_job_id), p_job_id, p_variant_id,
        nextval('outbox_variant_versions'),
        CASE WHEN p_event_type = 'variant_changed'
             THEN jsonb_build_object('status', p_status, 'step', p_step)
             ELSE '{}'::jsonb END,
        nullif(current_setting('outbox.traceparent', true), '')
    );
END
$$;

-- As in 0009, with the writer's trace context on the one-expression path (the other paths append
-- through outbox_append_variant_event, above).
CREATE OR REPLACE FUNCTION outbox_capture_variant_update() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.job_id = OLD.job_id AND NEW.job_variants_id = OLD.job_variants_id
       AND NEW.status::text IN ('queued', 'running', 'done', 'failed')
       AND coalesce(octet_length(NEW.current_step::text), 0) <= 65000
       AND (NEW.status IS DISTINCT FROM OLD.status OR NEW.current_step IS DISTINCT FROM OLD.current_step)
       AND current_setting('outbox.captured', true) IS DISTINCT FROM 'on'
       AND set_config('outbox.captured', 'on', true) = 'on' THEN
        INSERT INTO outbox_events
            (event_type, schema_version, partition, job_id, variant_id, variant_version, payload, trace_parent)
        VALUES (
            'variant_changed', 1, outbox_partition_of(NEW.job_id), NEW.job_id, NEW.job_variants_id,
            nextval('outbox_variant_versions'),
            jsonb_object(ARRAY['status', NEW.status::text, 'step', NEW.current_step::text]),
            nullif(current_setting('outbox.traceparent', true), '')
        );
        RETURN NULL;
    END IF;
    IF NEW.status IS NOT DISTINCT FROM OLD.status
       AND NEW.current_step IS NOT DISTINCT FROM OLD.current_step
       AND NEW.job_id IS NOT DISTINCT FROM OLD.job_id
       AND NEW.job_variants_id IS NOT DISTINCT FROM OLD.job_variants_id THEN
        RETURN NULL;  -- updated_at or another column: nothing the processor folds
    END IF;
    IF NEW.status IS NULL OR NEW.status::text NOT IN ('queued', 'running', 'done', 'failed')
       OR (NEW.job_id IS NOT NULL AND octet_length(NEW.current_step::text) > 65000) THEN
        PERFORM outbox_refuse_variant(NEW.status::text, NEW.current_step::text);
    END IF;
    PERFORM outbox_capture_change(
        OLD.job_variants_id, OLD.job_id, NEW.job_variants_id, NEW.job_id, NEW.status::text, NEW.current_step::text);
    RETURN NULL;
END
$$;

-- The processor's token is now processor:13; an older worker is refused at its next write.
CREATE OR REPLACE FUNCTION outbox_guard_job_state() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF OLD.status IS NOT DISTINCT FROM NEW.status AND OLD.current_step IS NOT DISTINCT FROM NEW.current_step THEN
        RETURN NULL;
    END IF;
    IF current_setting('outbox.job_writer', true) IN ('processor:13', 'hold') THEN
        RETURN NULL;
    END IF;
    IF current_setting('outbox.job_writer', true) IN ('processor', 'processor:12') THEN
        RAISE EXCEPTION 'this outbox worker is older than the database''s schema (migration 0013): upgrade it'
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
    WHEN (current_setting('outbox.job_writer', true) IS DISTINCT FROM 'processor:13')
    EXECUTE FUNCTION outbox_guard_job_state();
