-- 0007: a cheaper capture (bench/README.md, "Writer path", has the measurements behind it). What
-- capture adds to a single-variant update transaction went from about 215,000 to about 130,000
-- server instructions (bench/capture_instructions.sh; the update alone is about 144,000). What is
-- captured, and when, is unchanged, but for one new refusal: a step over 65,000 bytes, which the
-- payload-size CHECK this replaces refused already (2). The figures below are each change's
-- share, from callgrind.
--
-- 1. No WHEN clause on the update trigger. PostgreSQL reads a trigger's WHEN clause from its stored
--    node tree and compiles it again for every statement that fires it: about 50,000 instructions
--    per writer transaction. The same test in the trigger function costs a few thousand, and an
--    update that changes nothing the processor folds still appends nothing.
-- 2. No CHECK constraint on outbox_events: its expression is likewise read and compiled again for
--    every INSERT statement (about 19,000 instructions). What it bounded is still bounded, at no
--    cost on the common path: capture refuses a step over 65,000 bytes when it would write it into
--    an event (the CHECK refused a payload over 65,536 bytes), and an event appended around capture
--    whose payload is over 64 kB becomes a dead letter whose payload the worker never receives
--    (outbox_payload_fits below).
-- 3. The trigger writes its INSERT itself rather than through outbox_append_variant_event: a nested
--    PL/pgSQL call costs about 19,000 instructions. The function stays, for the adoption backfill
--    and `verify --repair`; tests/integration/test_capture.py checks that both write the same row.
-- 4. The trigger builds the payload with jsonb_object(text[]), which takes text as it is, rather
--    than jsonb_build_object, which looks up each argument's type and output function on every
--    call (about 4,000 instructions). The same jsonb value (the test above checks it).
--
-- The trade-off of 1: an UPDATE of other columns only (updated_at, say) used to be skipped by the
-- WHEN clause, evaluated per row after a per-statement compile; now every updated row queues the
-- trigger and calls the function, which returns at once. That is cheaper for the common
-- single-row update (a heartbeat) and dearer for a bulk update of other columns.
--
-- Measured and not done: dropping the variant_id index (about 10,000 instructions) would leave
-- `outbox replay` reading the whole outbox for each chunk of jobs, under the checkpoint lock.

DROP TRIGGER outbox_capture_variant_update ON jobs_variants;
ALTER TABLE outbox_events DROP CONSTRAINT outbox_events_payload_size;

-- The bound on what the processor reads of an event: its payload as JSON text takes at most 65,536
-- bytes. Decided alike by the drain statement and by processor.decode (an event over it is a dead
-- letter, whose payload is never sent to the worker, so no batch of oversized events, which only a
-- writer going around capture can append, fills the worker's memory), and the same however the
-- value happens to be stored (compressed or not, pglz or lz4). The first test is the cheap one,
-- and settles every event capture writes: an uncompressed jsonb of at most 10,000 bytes is at most
-- 6 times that as text (\u escapes); a larger or compressed one is measured as text. Both
-- functions are STABLE, as pg_column_size is, so the planner inlines them (declared IMMUTABLE, a
-- body calling a STABLE function is not inlined but called per row: 8% of the drain).
-- Known limit: a number in JSON is stored in a few bytes however many digits it prints as, so a
-- small payload written around capture with numbers of thousands of digits passes the first test.
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

-- Refuses at write time what the processor could never fold (a status) or that an event must not
-- carry (a step over 65,000 bytes), so nothing wrong is recorded: called by capture only when one
-- of them is not acceptable, so the common path pays one test.
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

-- Capture of updates, the writers' hot path: each update that changes a variant's status, step,
-- job or id appends an event in the writer's transaction. PL/pgSQL prepares each IF's expression
-- again in every transaction, so there are no more of them than the rules need. The validation is
-- written out here and in outbox_capture_variant_change rather than in a shared function: a nested
-- PL/pgSQL call costs about 19,000 instructions (3 above); outbox_refuse_variant, called only on
-- bad input, holds the one copy of the error messages.
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
