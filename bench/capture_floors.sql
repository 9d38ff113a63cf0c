-- The floors of capture by a PL/pgSQL row trigger: what any such capture costs a writer, whatever
-- it writes. Installed (disabled) beside the product's triggers by bench/run.py (writers group) and
-- bench/capture_instructions.sh, on their scratch databases only; each is measured on its own.
--
-- bench_floor_empty_trigger: an AFTER UPDATE row trigger whose function only returns (the
--   after-trigger queue, the PL/pgSQL call, NEW and OLD).
-- bench_floor_bare_insert: the same, inserting the least an event could hold (job, variant,
--   payload) into a table with no index, no default and no constraint.
CREATE TABLE bench_floor_events (job_id uuid, variant_id uuid, payload jsonb);

CREATE FUNCTION bench_floor_empty() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RETURN NULL;
END
$$;

CREATE FUNCTION bench_floor_insert() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO bench_floor_events
    VALUES (NEW.job_id, NEW.job_variants_id,
            jsonb_object(ARRAY['status', NEW.status::text, 'step', NEW.current_step::text]));
    RETURN NULL;
END
$$;

CREATE TRIGGER bench_floor_empty_trigger AFTER UPDATE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION bench_floor_empty();
CREATE TRIGGER bench_floor_bare_insert AFTER UPDATE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION bench_floor_insert();
ALTER TABLE jobs_variants DISABLE TRIGGER bench_floor_empty_trigger;
ALTER TABLE jobs_variants DISABLE TRIGGER bench_floor_bare_insert;
