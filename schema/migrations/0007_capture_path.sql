-- 0007: a cheaper capture: no WHEN clause on the update trigger, no payload-size CHECK (the bound is
-- outbox_payload_fits), an update trigger function of its own that writes its INSERT itself, and a
-- new refusal of a step over 65,000 bytes.
--
-- Why and the figures (215,000 to 130,000 instructions per writer transaction):
-- docs/decisions/0004-cheaper-capture.md.

DROP TRIGGER outbox_capture_variant_update ON jobs_variants;
ALTER TABLE outbox_events DROP CONSTRAINT outbox_events_payload_size;

-- The bound on what the processor reads of an event (65,536 bytes as JSON text); STABLE, so inlined.
CREATE FUNCTION outbox_payload_fits(p_payload jsonb) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT (pg_column_size(p_payload) <= 10000 AND pg_column_compression(p_payload) IS NULL)
           OR octet_length(p_payload::text) <= 65536
$$;

-- An event's payload as the processor reads it for decoding: NULL when it does not fit.
CREATE FUNCTION outbox_event_payload(p_payload jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT CASE WHEN outbox_payload_fits(p_payload) THEN p_payload::text END $$;

-- Refuses a status the processor could never fold, or a step over 65,000 bytes.
CREATE FUNCTION outbox_refuse_variant(p_status text, p_step text) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('queued', 'running', 'done', 'failed') THEN
        RAISE EXCEPTION 'jobs_variants.status must be one of queued, running, done, failed (got %)',
            coalesce(quote_literal(p_status), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF octet_length(p_step) > 65000 THEN
        RAISE EXCEPTION 'jobs_variants.current_step is % bytes long; an event may carry a step of at most 65,000 bytes',
            octet_length(p_step)
            USING ERRCODE = 'check_violation';
    END IF;
END
$$;

-- Capture of inserts and deletes, by the trigger outbox_capture_variant_insert_delete (0001); updates
-- have their own function below. 0001 and 0006 explain why an AFTER ROW trigger.
CREATE OR REPLACE FUNCTION outbox_capture_variant_change() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF OLD.job_id IS NOT NULL THEN
            PERFORM outbox_append_variant_event('variant_removed', OLD.job_id, OLD.job_variants_id, NULL, NULL);
        END IF;
        RETURN NULL;
    END IF;
    -- The status always (as 0001), the step's size only when it is written into an event.
    IF NEW.status IS NULL OR NEW.status NOT IN ('queued', 'running', 'done', 'failed')
       OR (NEW.job_id IS NOT NULL AND octet_length(NEW.current_step::text) > 65000) THEN
        PERFORM outbox_refuse_variant(NEW.status::text, NEW.current_step::text);
    END IF;
    -- A variant without a job has nothing to fold; it is captured once it gets one.
    IF NEW.job_id IS NOT NULL THEN
        PERFORM outbox_append_variant_event(
            'variant_changed', NEW.job_id, NEW.job_variants_id, NEW.status, NEW.current_step);
    END IF;
    RETURN NULL;
END
$$;

-- Capture of updates, the writers' hot path.
CREATE FUNCTION outbox_capture_variant_update() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.status IS NOT DISTINCT FROM OLD.status
       AND NEW.current_step IS NOT DISTINCT FROM OLD.current_step
       AND NEW.job_id IS NOT DISTINCT FROM OLD.job_id
       AND NEW.job_variants_id IS NOT DISTINCT FROM OLD.job_variants_id THEN
        RETURN NULL;  -- updated_at or another column: nothing the processor folds
    END IF;
    -- The status always (as 0001), the step's size only when it is written into an event.
    IF NEW.status IS NULL OR NEW.status NOT IN ('queued', 'running', 'done', 'failed')
       OR (NEW.job_id IS NOT NULL AND octet_length(NEW.current_step::text) > 65000) THEN
        PERFORM outbox_refuse_variant(NEW.status::text, NEW.current_step::text);
    END IF;
    -- The variant leaves its job: given another id, detached, or moved to another job (0006).
    IF (NEW.job_id IS DISTINCT FROM OLD.job_id OR NEW.job_variants_id IS DISTINCT FROM OLD.job_variants_id)
       AND OLD.job_id IS NOT NULL THEN
        PERFORM outbox_append_variant_event('variant_removed', OLD.job_id, OLD.job_variants_id, NULL, NULL);
    END IF;
    -- A variant without a job has nothing to fold; it is captured once it gets one.
    -- The row outbox_append_variant_event('variant_changed', ...) writes, written here directly.
    IF NEW.job_id IS NOT NULL THEN
        INSERT INTO outbox_events (event_type, schema_version, partition, job_id, variant_id, variant_version, payload)
        VALUES (
            'variant_changed', 1, outbox_partition_of(NEW.job_id), NEW.job_id, NEW.job_variants_id,
            nextval('outbox_variant_versions'),
            jsonb_object(ARRAY['status', NEW.status::text, 'step', NEW.current_step::text])
        );
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_capture_variant_update
    AFTER UPDATE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION outbox_capture_variant_update();
