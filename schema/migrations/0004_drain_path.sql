-- 0004: the drain path: the variant-state upsert records the job a variant moved from, free space
-- on the pages of variant states and checkpoints, and outbox_variant_states_merge.
--
-- Why and the figures: docs/decisions/0002-one-statement-drain.md.

-- The variant-state upsert records the job a variant moved from, read from the row it replaces
-- (ON CONFLICT DO UPDATE sees it), so finding the jobs to refold takes no second index lookup per
-- variant. Only meaningful in the RETURNING of the statement that set it.
ALTER TABLE outbox_variant_states ADD COLUMN moved_from uuid;

-- Free space on each page lets an update of a variant's state (or of the checkpoint row, once
-- per batch) stay on its page without new index entries (a HOT update): job_id and variant_id do
-- not change on the common update, so no index needs touching.
ALTER TABLE outbox_variant_states SET (fillfactor = 50);
ALTER TABLE outbox_checkpoints SET (fillfactor = 50);

-- The one place where the rule "a variant's state only moves to a newer version" lives: the
-- drain statement (events_apply) and the Python-decoded path (variant_states_upsert) both merge
-- through it. Returns, for each state stored, its job and the job the variant left (moved_from).
CREATE FUNCTION outbox_variant_states_merge(p_states outbox_variant_states[])
RETURNS TABLE (merged_job_id uuid, merged_moved_from uuid)
LANGUAGE sql
AS $$
    INSERT INTO outbox_variant_states AS s (variant_id, job_id, version, status, step, removed, problem, event_id)
    SELECT variant_id, job_id, version, status, step, removed, problem, event_id
    FROM unnest(p_states)
    ON CONFLICT (variant_id) DO UPDATE
        SET job_id = excluded.job_id,
            version = excluded.version,
            status = excluded.status,
            step = excluded.step,
            removed = excluded.removed,
            problem = excluded.problem,
            event_id = excluded.event_id,
            moved_from = CASE WHEN s.job_id <> excluded.job_id THEN s.job_id END
        -- Latest by version: a duplicate or an older change is a no-op.
        -- A fixed event (dead-letters retry) replaces the problem state of its own version.
        WHERE s.version < excluded.version
           OR (s.version = excluded.version AND s.problem IS NOT NULL AND excluded.problem IS NULL)
    RETURNING s.job_id, s.moved_from
$$;
