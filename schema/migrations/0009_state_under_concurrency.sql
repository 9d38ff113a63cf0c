-- 0009: no wrong state, whatever runs at the same time: the newest state of a variant, reading an
-- event, the fold configuration and "pending" each get one SQL home; a transaction's later captures
-- append the row as it is; jobs waiting to be folded record since when and when to retry.
--
-- Why: docs/decisions/0006-one-home-per-rule-under-concurrency.md.

-- 1. The newest state of a variant: the highest version, then the highest event id (two events of
-- one version exist only when written by hand). The merge into outbox_variant_states, the baseline
-- that prune keeps, the drain and the rebuild of replay all go through these two functions.
CREATE FUNCTION outbox_state_newer(p_version bigint, p_event_id bigint, p_than_version bigint, p_than_event_id bigint)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT (p_version, p_event_id) > (p_than_version, p_than_event_id) $$;

-- The newest of each variant's candidate states (an inlinable SQL function: its sort is planned
-- into the statement that calls it).
CREATE FUNCTION outbox_variant_states_newest(p_states outbox_variant_states[])
RETURNS SETOF outbox_variant_states
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT DISTINCT ON (variant_id) *
    FROM unnest(p_states)
    ORDER BY variant_id, version DESC, event_id DESC
$$;

-- Merge candidate states (any number per variant) into the stored ones: each variant moves only to
-- a newer state. Returns, for each state stored, its job and the job the variant left (moved_from).
-- A dead letter retried after a fix is applied by rebuilding its variant (processor/replay.py), not
-- by a special case here.
CREATE OR REPLACE FUNCTION outbox_variant_states_merge(p_states outbox_variant_states[])
RETURNS TABLE (merged_job_id uuid, merged_moved_from uuid)
LANGUAGE sql
AS $$
    INSERT INTO outbox_variant_states AS s (variant_id, job_id, version, status, step, removed, problem, event_id)
    SELECT variant_id, job_id, version, status, step, removed, problem, event_id
    FROM outbox_variant_states_newest(p_states)
    ON CONFLICT (variant_id) DO UPDATE
        SET job_id = excluded.job_id,
            version = excluded.version,
            status = excluded.status,
            step = excluded.step,
            removed = excluded.removed,
            problem = excluded.problem,
            event_id = excluded.event_id,
            moved_from = CASE WHEN s.job_id <> excluded.job_id THEN s.job_id END
        WHERE outbox_state_newer(excluded.version, excluded.event_id, s.version, s.event_id)
    RETURNING s.job_id, s.moved_from
$$;

-- The same merge into the baseline (what prune folded out of the events it removed).
CREATE FUNCTION outbox_variant_baseline_merge(p_states outbox_variant_states[])
RETURNS bigint
LANGUAGE sql
AS $$
    WITH merged AS (
        INSERT INTO outbox_variant_baseline AS b (variant_id, job_id, version, status, step, removed, problem, event_id)
        SELECT variant_id, job_id, version, status, step, removed, problem, event_id
        FROM outbox_variant_states_newest(p_states)
        ON CONFLICT (variant_id) DO UPDATE
            SET job_id = excluded.job_id,
                version = excluded.version,
                status = excluded.status,
                step = excluded.step,
                removed = excluded.removed,
                problem = excluded.problem,
                event_id = excluded.event_id
            WHERE outbox_state_newer(excluded.version, excluded.event_id, b.version, b.event_id)
        RETURNING 1
    )
    SELECT count(*) FROM merged
$$;

-- 2. Reading an event, decided once for the drain, replay's rebuild and prune's baseline.
CREATE FUNCTION outbox_event_decode(
    p_event_type text, p_schema_version integer, p_job_id uuid, p_variant_id uuid, p_version bigint,
    p_payload jsonb, p_versions_issued bigint
) RETURNS TABLE (status text, step text, removed boolean, readable boolean)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN p_event_type = 'variant_changed' THEN p.status #>> '{}' END,
           CASE WHEN p_event_type = 'variant_changed' THEN p.step #>> '{}' END,
           p_event_type = 'variant_removed',
           -- coalesce: a missing key makes these tests NULL, and NULL must mean "not readable".
           coalesce(
               p_job_id IS NOT NULL AND p_variant_id IS NOT NULL
               AND p_version BETWEEN 1 AND p_versions_issued
               AND p_schema_version = 1
               AND jsonb_typeof(p_payload) = 'object'
               -- Over the bound, a dead letter: the same test as outbox_event_payload's (0007).
               AND outbox_payload_fits(p_payload)
               AND (p_event_type = 'variant_removed'
                    OR (p_event_type = 'variant_changed'
                        -- A JSON string with a known status (jsonb equality checks the type too).
                        AND p.status IN ('"queued"'::jsonb, '"running"'::jsonb, '"done"'::jsonb, '"failed"'::jsonb)
                        AND (p.step IS NULL
                             OR p.step = 'null'::jsonb
                             OR (jsonb_typeof(p.step) = 'string' AND length(p.step #>> '{}') <= 200)))),
               false)
    -- Each key looked up once per event (OFFSET 0 keeps the planner from copying the lookups into
    -- every expression that uses them).
    FROM (SELECT p_payload -> 'status' AS status, p_payload -> 'step' AS step OFFSET 0) AS p
$$;

-- The highest version capture has issued so far (0 before the first). Every event a statement can
-- see was written after its version was taken, so it is at most this, read in the same statement.
CREATE FUNCTION outbox_versions_issued() RETURNS bigint
LANGUAGE sql VOLATILE
AS $$ SELECT coalesce(pg_sequence_last_value('outbox_variant_versions'), 0) $$;

-- What a variant's state says when its newest event cannot be read: the same words as
-- processor.decode's problem states.
CREATE FUNCTION outbox_unreadable_problem(p_event_id bigint, p_reason text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT format('event %s is a dead letter: %s', p_event_id, coalesce(p_reason, 'it cannot be read')) $$;

-- A dead letter with no trustworthy place in its variant's order holds its job.
ALTER TABLE outbox_dead_letters ADD COLUMN holds_job boolean NOT NULL DEFAULT false;
CREATE INDEX outbox_dead_letters_holding_idx ON outbox_dead_letters (job_id) WHERE holds_job AND discarded_at IS NULL;

-- 3. Jobs waiting to be folded: since when (the oldest change they wait to show: `outbox backlog`
-- reports it as lag), and, for a job whose row the application holds locked, when to try again.
-- The worker never waits for such a lock: the rest of its batch goes on (jobs_write).
ALTER TABLE outbox_dirty_jobs
    ADD COLUMN queued_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    ADD COLUMN retry_at timestamptz;

-- 4. The fold configuration, in the database; each checkpoint records the version it folds with.
CREATE TABLE outbox_fold_config (
    only_row       boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    pipeline_steps text[] CHECK (cardinality(pipeline_steps) >= 1),  -- NULL until `outbox migrate` sets it
    failure_policy text NOT NULL DEFAULT 'settled' CHECK (failure_policy IN ('settled', 'immediate')),
    version        integer NOT NULL DEFAULT 0,
    changed_at     timestamptz
);

INSERT INTO outbox_fold_config DEFAULT VALUES;

ALTER TABLE outbox_checkpoints ADD COLUMN fold_config_version integer NOT NULL DEFAULT 0;

-- 5. The first capture of a transaction appends the change as written; every later capture
-- appends the row as it is now (outbox.captured marks that a capture happened).
CREATE FUNCTION outbox_capture_change(
    p_old_id uuid, p_old_job uuid, p_new_id uuid, p_new_job uuid, p_new_status text, p_new_step text
) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_row record;
BEGIN
    IF current_setting('outbox.captured', true) IS DISTINCT FROM 'on' THEN
        -- The transaction's first capture: the change as written (the rules of 0007 and 0008).
        PERFORM set_config('outbox.captured', 'on', true);
        IF p_old_job IS NOT NULL AND (p_new_id IS DISTINCT FROM p_old_id OR p_new_job IS DISTINCT FROM p_old_job) THEN
            PERFORM outbox_append_variant_event('variant_removed', p_old_job, p_old_id, NULL, NULL);
        END IF;
        IF p_new_job IS NOT NULL THEN
            PERFORM outbox_append_variant_event('variant_changed', p_new_job, p_new_id, p_new_status, p_new_step);
        END IF;
        RETURN;
    END IF;
    -- A later capture: the rows as they are now. The old job loses the variant unless the variant
    -- is in it now; first, so that the row's own state takes the newest version.
    IF p_old_job IS NOT NULL
       AND NOT EXISTS (SELECT FROM jobs_variants WHERE job_variants_id = p_old_id AND job_id = p_old_job) THEN
        PERFORM outbox_append_variant_event('variant_removed', p_old_job, p_old_id, NULL, NULL);
    END IF;
    -- The row (or the two rows, when this change gave the variant another id) as it is now.
    FOR v_row IN
        SELECT job_variants_id AS id, job_id, status::text AS status, current_step::text AS step
        FROM jobs_variants
        WHERE job_variants_id IN (p_old_id, p_new_id) AND job_id IS NOT NULL
        ORDER BY job_variants_id
    LOOP
        IF v_row.status IS NULL OR v_row.status NOT IN ('queued', 'running', 'done', 'failed')
           OR octet_length(v_row.step) > 65000 THEN
            PERFORM outbox_refuse_variant(v_row.status, v_row.step);
        END IF;
        PERFORM outbox_append_variant_event('variant_changed', v_row.job_id, v_row.id, v_row.status, v_row.step);
    END LOOP;
END
$$;

-- Capture of inserts and deletes (0007), through the rule above.
CREATE OR REPLACE FUNCTION outbox_capture_variant_change() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM outbox_capture_change(OLD.job_variants_id, OLD.job_id, NULL, NULL, NULL, NULL);
        RETURN NULL;
    END IF;
    -- The status always (as 0001), the step's size only when it is written into an event.
    IF NEW.status IS NULL OR NEW.status::text NOT IN ('queued', 'running', 'done', 'failed')
       OR (NEW.job_id IS NOT NULL AND octet_length(NEW.current_step::text) > 65000) THEN
        PERFORM outbox_refuse_variant(NEW.status::text, NEW.current_step::text);
    END IF;
    PERFORM outbox_capture_change(
        NULL, NULL, NEW.job_variants_id, NEW.job_id, NEW.status::text, NEW.current_step::text);
    RETURN NULL;
END
$$;

-- Capture of updates (0008), through the rule above: the one-expression path is the transaction's
-- first capture (the test of outbox.captured, then setting it, end the expression).
CREATE OR REPLACE FUNCTION outbox_capture_variant_update() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.job_id = OLD.job_id AND NEW.job_variants_id = OLD.job_variants_id
       AND NEW.status::text IN ('queued', 'running', 'done', 'failed')
       AND coalesce(octet_length(NEW.current_step::text), 0) <= 65000
       AND (NEW.status IS DISTINCT FROM OLD.status OR NEW.current_step IS DISTINCT FROM OLD.current_step)
       AND current_setting('outbox.captured', true) IS DISTINCT FROM 'on'
       AND set_config('outbox.captured', 'on', true) = 'on' THEN
        INSERT INTO outbox_events (event_type, schema_version, partition, job_id, variant_id, variant_version, payload)
        VALUES (
            'variant_changed', 1, outbox_partition_of(NEW.job_id), NEW.job_id, NEW.job_variants_id,
            nextval('outbox_variant_versions'),
            jsonb_object(ARRAY['status', NEW.status::text, 'step', NEW.current_step::text])
        );
        RETURN NULL;
    END IF;
    IF NEW.status IS NOT DISTINCT FROM OLD.status
       AND NEW.current_step IS NOT DISTINCT FROM OLD.current_step
       AND NEW.job_id IS NOT DISTINCT FROM OLD.job_id
       AND NEW.job_variants_id IS NOT DISTINCT FROM OLD.job_variants_id THEN
        RETURN NULL;  -- updated_at or another column: nothing the processor folds
    END IF;
    IF NEW.status IS NULL OR NEW.status::text NOT IN ('queued', 'running', 'done', 'failed')
       OR (NEW.job_id IS NOT NULL AND octet_length(NEW.current_step::text) > 65000) THEN
        PERFORM outbox_refuse_variant(NEW.status::text, NEW.current_step::text);
    END IF;
    PERFORM outbox_capture_change(
        OLD.job_variants_id, OLD.job_id, NEW.job_variants_id, NEW.job_id, NEW.status::text, NEW.current_step::text);
    RETURN NULL;
END
$$;

-- 6. What "pending" means, once: not yet visible in its partition's done snapshot.
CREATE FUNCTION outbox_events_pending(p_partition integer) RETURNS SETOF outbox_events
LANGUAGE sql STABLE
AS $$
    SELECT e.*
    FROM outbox_checkpoints AS c
    CROSS JOIN LATERAL (
        SELECT *
        FROM outbox_events AS o
        WHERE o.partition = c.partition
          -- Below the done snapshot's xmin every transaction is finished and visible in it.
          AND o.txid >= pg_snapshot_xmin(c.done_snapshot)
          AND NOT pg_visible_in_snapshot(o.txid, c.done_snapshot)
    ) AS e
    WHERE p_partition IS NULL OR c.partition = p_partition
$$;
