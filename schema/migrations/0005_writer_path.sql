-- 0005: the writer's path: outbox_append_variant_event becomes PL/pgSQL (planned once per session),
-- with the same signature, event shape and semantics.
--
-- Why and the figures: docs/decisions/0003-capture-appends-through-plpgsql.md.
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
