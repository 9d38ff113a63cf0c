-- 0008: the writers' common update is captured by one expression; every other update takes 0007's
-- rules, in their order. What is captured, and what is refused, is unchanged.
--
-- Why and the figures (131,000 to 116,000 instructions): docs/decisions/0005-one-expression-capture.md.

CREATE OR REPLACE FUNCTION outbox_capture_variant_update() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- The common shape, in one expression: same job (not none) and same id, a valid status, no step
    -- or one that fits in an event, and a new status or step. A NULL job, id or status makes the
    -- expression NULL: not taken.
    IF NEW.job_id = OLD.job_id AND NEW.job_variants_id = OLD.job_variants_id
       AND NEW.status IN ('queued', 'running', 'done', 'failed')
       AND coalesce(octet_length(NEW.current_step::text), 0) <= 65000
       AND (NEW.status IS DISTINCT FROM OLD.status OR NEW.current_step IS DISTINCT FROM OLD.current_step) THEN
        INSERT INTO outbox_events (event_type, schema_version, partition, job_id, variant_id, variant_version, payload)
        VALUES (
            'variant_changed', 1, outbox_partition_of(NEW.job_id), NEW.job_id, NEW.job_variants_id,
            nextval('outbox_variant_versions'),
            jsonb_object(ARRAY['status', NEW.status::text, 'step', NEW.current_step::text])
        );
        RETURN NULL;
    END IF;
    -- Every other update: the rules of 0007, in their order.
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
    IF NEW.job_id IS NOT NULL THEN
        PERFORM outbox_append_variant_event(
            'variant_changed', NEW.job_id, NEW.job_variants_id, NEW.status, NEW.current_step);
    END IF;
    RETURN NULL;
END
$$;
