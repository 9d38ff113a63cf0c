-- 0014: rolling upgrades: the functions a worker calls by name on its hot path get versioned names
-- (the same definitions, renamed), and each migration records the oldest worker version it serves.
--
-- Serves workers from: 14
--
-- Why: docs/decisions/0013-rolling-upgrades.md. Safe to run again. A later migration that changes one of these
-- functions creates the next version beside it (outbox_event_decode_v2) and keeps this one for as
-- long as it declares it serves workers that call it; workers of version 13 and older refuse any
-- schema but their own, so this one serves workers from 14 on.

-- The oldest worker version each migration serves (NULL before 0014: only its own version).
ALTER TABLE outbox_schema_migrations ADD COLUMN IF NOT EXISTS serves_workers_from integer;

-- The worker's batch statement (events_apply) and replay's rebuild, prune's baseline, explain; the
-- worker's job-state write (jobs_write) and an idle worker. Each renamed where it still has its old
-- name, so that the migration can run again on a database that has it (as 0012 and 0013 can).
DO $$
DECLARE
    renames constant text[][] := ARRAY[
        ['outbox_event_decode(text, integer, uuid, uuid, bigint, jsonb, bigint)', 'outbox_event_decode_v1'],
        ['outbox_variant_states_merge(outbox_variant_states[])', 'outbox_variant_states_merge_v1'],
        ['outbox_versions_issued()', 'outbox_versions_issued_v1'],
        ['outbox_unreadable_problem(bigint, text)', 'outbox_unreadable_problem_v1'],
        ['outbox_event_applied(xid8, bigint, pg_snapshot, pg_snapshot, xid8, bigint)', 'outbox_event_applied_v1'],
        ['outbox_transitions_publish()', 'outbox_transitions_publish_v1']];
    i integer;
BEGIN
    FOR i IN 1 .. array_length(renames, 1) LOOP
        IF to_regprocedure(renames[i][1]) IS NOT NULL THEN
            EXECUTE format('ALTER FUNCTION %s RENAME TO %I', renames[i][1], renames[i][2]);
        END IF;
    END LOOP;
END
$$;
