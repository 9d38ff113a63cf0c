-- 0005: the writer's path (bench/README.md, "Writer path", has the measurements behind it).
--
-- The capture trigger appends each event through outbox_append_variant_event, which was a
-- LANGUAGE sql function. Called from PL/pgSQL (the trigger's PERFORM), a SQL function is parsed,
-- analysed and planned again in every transaction before PostgreSQL 18: its plan lives in the
-- caller's expression state, which PL/pgSQL rebuilds per transaction. For a single-variant update
-- transaction that re-planning was more than half of what capture cost the database. As PL/pgSQL,
-- the function's INSERT is planned once per session (and planned again when something it depends
-- on changes, such as outbox_partition_of being replaced).
--
-- The same signature, event shape, and semantics as in 0001; the function remains the one place
-- that shapes a variant event, for the trigger (whatever migration last defined it), the adoption
-- backfill and `verify --repair`. It runs in the caller's transaction and, from the trigger, while
-- the writer holds the variant's row lock, so the version taken here still orders a variant's
-- changes as they commit.
CREATE OR REPLACE FUNCTION outbox_append_variant_event(
    p_event_type text, p_job_id uuid, p_variant_id uuid, p_status text, p_step text
) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO outbox_events (event_type, schema_version, partition, job_id, variant_id, variant_version, payload)
    VALUES (
        p_event_type, 1, outbox_partition_of(p_job_id), p_job_id, p_variant_id,
        nextval('outbox_variant_versions'),
        CASE WHEN p_event_type = 'variant_changed'
             THEN jsonb_build_object('status', p_status, 'step', p_step)
             ELSE '{}'::jsonb END
    );
END
$$;
