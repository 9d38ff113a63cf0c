-- 0008: one test on the writers' common path. What capture adds to a single-variant update
-- transaction went from about 131,000 to about 116,000 server instructions
-- (bench/capture_instructions.sh). What is captured, and what is refused, is unchanged.
--
-- Why: PL/pgSQL builds the executable state of each expression it evaluates again in every
-- transaction (its expression states live in a per-transaction context), at a cost of a few
-- thousand instructions each whatever the expression's size. The 0007 function evaluated four
-- IF expressions on every captured update (nothing changed? valid? leaving its job? has a job?).
-- Nearly every update a pipeline writes is the same shape: a variant that stays in its job gets a
-- valid new status or step. One expression recognises that shape and appends its event; every
-- other update (nothing the processor folds changed, a bad status or step, a variant given another
-- id, moved or detached, or without a job) takes the 0007 path, written out again below, whose
-- rarer branches append through outbox_append_variant_event (the same row, checked by
-- tests/integration/test_capture.py).
--
-- The trade-off: the rarer shapes pay a little more than under 0007. An update that changes
-- nothing captured (updated_at only) evaluates two expressions instead of one, a few thousand
-- instructions more; a move, an attach or a new id appends its variant_changed through
-- outbox_append_variant_event, a nested PL/pgSQL call (about 19,000 more, 0007).
--
-- Measured and not done (bench/README.md, "Writer path"): dropping the variant_id index (about
-- 15,000 instructions; `outbox replay` reads by it) and the event_id primary key (about 11,000
-- more; dead letters, `events` and `prune` look events up by it).

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
