-- 0007: a cheaper capture (bench/README.md, "Writer path", has the measurements behind it). What
-- capture adds to a single-variant update transaction went from about 215,000 to about 114,000
-- server instructions (bench/capture_instructions.sh; the update alone is about 144,000). What is
-- captured, and when, is unchanged. The figures below are each change's share, from callgrind.
--
-- 1. No WHEN clause on the update trigger. PostgreSQL reads a trigger's WHEN clause from its stored
--    node tree and compiles it again for every statement that fires it: about 50,000 instructions
--    per writer transaction. The same test in the trigger function costs a few thousand, and an
--    update that changes nothing the processor folds still appends nothing.
-- 2. No CHECK constraint on outbox_events: its expression is likewise read and compiled again for
--    every INSERT statement (about 19,000 instructions). Its purpose, bounded events, is kept:
--    capture refuses a step longer than an event may carry (200 characters, as the payload model
--    and the drain statement), so a captured payload stays under 300 bytes; an event written
--    around capture with a payload stored in over 65,536 bytes becomes a dead letter, and the
--    processor never loads its payload (outbox_payload_fits below).
-- 3. The trigger writes its INSERT itself rather than through outbox_append_variant_event: a nested
--    PL/pgSQL call costs about 19,000 instructions. The function stays, for the adoption backfill
--    and `verify --repair`; tests/integration/test_capture.py checks that both write the same row.
-- 4. The trigger builds the payload with jsonb_object(text[]), which takes text as it is, rather
--    than jsonb_build_object, which looks up each argument's type and output function on every
--    call (about 4,000 instructions). The same jsonb value (the test above checks it).
-- 5. No index on outbox_events.variant_id: every event paid an index insert (about 10,000
--    instructions) for the sake of `outbox replay`, which now reads the events of the variants it
--    replays in one pass over the outbox (kept short by `outbox prune`).

DROP TRIGGER outbox_capture_variant_update ON jobs_variants;
ALTER TABLE outbox_events DROP CONSTRAINT outbox_events_payload_size;
DROP INDEX outbox_events_variant_id_idx;

-- The bound on what the processor reads of an event: its payload as stored (after compression)
-- takes at most 65,536 bytes. An event over it becomes a dead letter (processor.decode), decided
-- alike by the drain statement and by processor.decode, and its payload is never sent to the
-- worker, so no batch of oversized events (which only a writer going around capture can append)
-- fills the worker's memory. Both functions are inlined by the planner: STABLE, as pg_column_size is
-- (declared IMMUTABLE, a body calling a STABLE function is not inlined, but called per row).
CREATE FUNCTION outbox_payload_fits(p_payload jsonb) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT pg_column_size(p_payload) <= 65536 $$;

-- An event's payload as the processor reads it for decoding: NULL when it does not fit.
CREATE FUNCTION outbox_event_payload(p_payload jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT CASE WHEN outbox_payload_fits(p_payload) THEN p_payload::text END $$;

-- Refuses at write time what the processor could never fold, so nothing wrong is recorded: called
-- by capture only when a status or step is not acceptable, so the common path pays one test.
CREATE FUNCTION outbox_refuse_variant(p_status text, p_step text) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('queued', 'running', 'done', 'failed') THEN
        RAISE EXCEPTION 'jobs_variants.status must be one of queued, running, done, failed (got %)',
            coalesce(quote_literal(p_status), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF length(p_step) > 200 THEN
        RAISE EXCEPTION 'jobs_variants.current_step is % characters long; a step may have at most 200',
            length(p_step)
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
    IF NEW.status IS NULL OR NEW.status NOT IN ('queued', 'running', 'done', 'failed')
       OR length(NEW.current_step::text) > 200 THEN
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

-- Capture of updates, the writers' hot path: each update that changes a variant's status, step,
-- job or id appends an event in the writer's transaction. PL/pgSQL prepares each IF's expression
-- again in every transaction, so there are no more of them than the rules need.
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
    IF NEW.status IS NULL OR NEW.status NOT IN ('queued', 'running', 'done', 'failed')
       OR length(NEW.current_step::text) > 200 THEN
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
