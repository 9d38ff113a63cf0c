-- All of the processor's SQL at run time, named noun_verb. processor/store.py is the only module
-- that runs these.

-- name: checkpoint_get
SELECT done_snapshot::text, target_snapshot::text, last_txid::text, last_event_id, events_applied, updated_at
FROM outbox_checkpoints
WHERE partition = %(partition)s

-- name: checkpoint_lock
-- FOR UPDATE serialises every transaction that moves this partition's checkpoint: a second
-- consumer (a zombie, or one that got past the advisory lock through a pooler) waits here, then
-- sees the moved checkpoint and applies nothing (processor.batch.FencedError).
SELECT done_snapshot::text, target_snapshot::text, last_txid::text, last_event_id
FROM outbox_checkpoints
WHERE partition = %(partition)s
FOR UPDATE

-- name: events_fetch
-- The events of the transactions that committed after the done snapshot and are visible in the
-- target snapshot (this statement's own snapshot when none is given), in (txid, event_id) order.
-- Not visible in the done snapshot means: txid at or above its xmax, or in its xip list; the two
-- branches read each of those from the index. A transaction still running is in neither result,
-- and stays in the next target's xip list until it ends: a late commit is picked up, not skipped.
WITH target AS MATERIALIZED (
    SELECT coalesce(%(target)s::pg_snapshot, pg_current_snapshot()) AS snapshot
)
SELECT e.event_id, e.txid::text, e.event_type, e.schema_version, e.job_id, e.variant_id,
       e.variant_version, e.payload, e.created_at, (SELECT snapshot::text FROM target)
FROM (
    (SELECT *
     FROM outbox_events
     WHERE partition = %(partition)s
       AND txid >= %(done_xmax)s::xid8
       AND txid < (SELECT pg_snapshot_xmax(snapshot) FROM target)
       AND (txid, event_id) > (%(after_txid)s::xid8, %(after_event_id)s::bigint)
       AND pg_visible_in_snapshot(txid, (SELECT snapshot FROM target))
     ORDER BY txid, event_id
     LIMIT %(limit)s)
    UNION ALL
    (SELECT *
     FROM outbox_events
     WHERE partition = %(partition)s
       AND txid = ANY(%(done_xip)s::xid8[])
       AND (txid, event_id) > (%(after_txid)s::xid8, %(after_event_id)s::bigint)
       AND pg_visible_in_snapshot(txid, (SELECT snapshot FROM target))
     ORDER BY txid, event_id
     LIMIT %(limit)s)
) AS e
ORDER BY e.txid, e.event_id
LIMIT %(limit)s

-- name: events_pending_count
-- Committed events not applied yet: not visible in the done snapshot, and not among those of the
-- catch-up in progress that are already applied.
SELECT count(*)
FROM outbox_events
WHERE partition = %(partition)s
  AND (txid >= %(done_xmax)s::xid8 OR txid = ANY(%(done_xip)s::xid8[]))
  AND NOT (%(target)s::pg_snapshot IS NOT NULL
           AND pg_visible_in_snapshot(txid, %(target)s::pg_snapshot)
           AND (txid, event_id) <= (%(after_txid)s::xid8, %(after_event_id)s::bigint))

-- name: variant_states_upsert
-- Returns the jobs to refold: the variants' jobs now, and before (a variant moved to another job);
-- all parts of one statement see the same snapshot, so "previous" is the state before the upsert.
-- With defer, the jobs are kept in outbox_dirty_jobs instead, for when the catch-up is complete.
WITH incoming AS (
    SELECT *
    FROM unnest(
        %(variant_ids)s::uuid[], %(job_ids)s::uuid[], %(versions)s::bigint[], %(statuses)s::text[],
        %(steps)s::text[], %(removed)s::boolean[], %(problems)s::text[], %(event_ids)s::bigint[]
    ) AS t (variant_id, job_id, version, status, step, removed, problem, event_id)
), previous AS (
    SELECT s.job_id
    FROM outbox_variant_states AS s
    JOIN incoming AS i USING (variant_id)
), upserted AS (
    INSERT INTO outbox_variant_states AS s (variant_id, job_id, version, status, step, removed, problem, event_id)
    SELECT variant_id, job_id, version, status, step, removed, problem, event_id
    FROM incoming
    ON CONFLICT (variant_id) DO UPDATE
        SET job_id = excluded.job_id,
            version = excluded.version,
            status = excluded.status,
            step = excluded.step,
            removed = excluded.removed,
            problem = excluded.problem,
            event_id = excluded.event_id
        -- Latest by version: a duplicate or an older change is a no-op.
        WHERE s.version < excluded.version
    RETURNING s.job_id
), affected AS (
    SELECT job_id FROM previous
    UNION
    SELECT job_id FROM upserted
), deferred AS (
    INSERT INTO outbox_dirty_jobs (partition, job_id)
    SELECT %(partition)s, job_id FROM affected WHERE %(defer)s
    ON CONFLICT DO NOTHING
)
SELECT job_id FROM affected WHERE NOT %(defer)s

-- name: variant_states_for_jobs
SELECT job_id, variant_id, version, status, step, removed, problem
FROM outbox_variant_states
WHERE job_id = ANY(%(job_ids)s::uuid[])

-- name: dirty_jobs_count
SELECT count(*) FROM outbox_dirty_jobs WHERE partition = %(partition)s

-- name: dirty_jobs_exist
SELECT EXISTS (SELECT 1 FROM outbox_dirty_jobs WHERE partition = %(partition)s)

-- name: dirty_jobs_add_flagged
-- At start-up, flagged jobs are folded again: the pipeline setting may have been fixed.
INSERT INTO outbox_dirty_jobs (partition, job_id)
SELECT %(partition)s, job_id
FROM outbox_job_flags
WHERE outbox_partition_of(job_id) = %(partition)s
ON CONFLICT DO NOTHING

-- name: dirty_jobs_take
DELETE FROM outbox_dirty_jobs
WHERE partition = %(partition)s
  AND job_id IN (
      SELECT job_id FROM outbox_dirty_jobs WHERE partition = %(partition)s ORDER BY job_id LIMIT %(limit)s
  )
RETURNING job_id

-- name: batch_commit
-- Job states, job flags, dead letters and the checkpoint, in one statement of the batch's
-- transaction.
WITH job_updates AS (
    UPDATE jobs AS j
    SET status = t.status,
        current_step = t.current_step,
        updated_at = now()
    FROM unnest(%(job_ids)s::uuid[], %(job_statuses)s::text[], %(job_steps)s::text[])
        AS t (job_id, status, current_step)
    WHERE j.job_id = t.job_id
      AND (j.status, j.current_step) IS DISTINCT FROM (t.status, t.current_step)
    RETURNING j.job_id
), flags_cleared AS (
    DELETE FROM outbox_job_flags
    WHERE job_id = ANY(%(job_ids)s::uuid[])
), flags_set AS (
    INSERT INTO outbox_job_flags AS f (job_id, reason)
    SELECT * FROM unnest(%(flag_job_ids)s::uuid[], %(flag_reasons)s::text[])
    ON CONFLICT (job_id) DO UPDATE SET reason = excluded.reason, flagged_at = now()
        WHERE f.reason <> excluded.reason
), parked AS (
    INSERT INTO outbox_dead_letters (event_id, partition, job_id, variant_id, reason)
    SELECT event_id, %(partition)s, job_id, variant_id, reason
    FROM unnest(%(dead_event_ids)s::bigint[], %(dead_job_ids)s::uuid[], %(dead_variant_ids)s::uuid[],
                %(dead_reasons)s::text[]) AS t (event_id, job_id, variant_id, reason)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
), advanced AS (
    UPDATE outbox_checkpoints
    SET done_snapshot = %(done)s::pg_snapshot,
        target_snapshot = %(target)s::pg_snapshot,
        last_txid = %(after_txid)s::xid8,
        last_event_id = %(after_event_id)s,
        events_applied = events_applied + %(event_count)s,
        updated_at = clock_timestamp()
    WHERE partition = %(partition)s
    RETURNING updated_at
)
SELECT (SELECT count(*) FROM job_updates) AS jobs_changed,
       (SELECT count(*) FROM parked) AS dead_letters,
       (SELECT updated_at FROM advanced) AS committed_at

-- name: consumer_lock_try
-- Session-level: held by the connection that writes, released when it closes or dies.
SELECT pg_try_advisory_lock(%(lock_class)s, %(partition)s)

-- name: consumer_lock_holder
SELECT a.pid, a.application_name, a.backend_start
FROM pg_locks AS l
JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory'
  AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %(lock_class)s::int::oid
  AND l.objid = %(partition)s::int::oid
  AND l.objsubid = 2

-- name: migrations_table_create
CREATE TABLE IF NOT EXISTS outbox_schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: migrations_lock
-- One migrate at a time; released at commit.
SELECT pg_advisory_xact_lock(%(lock_class)s, -1)

-- name: migrations_applied
SELECT version FROM outbox_schema_migrations ORDER BY version

-- name: migrations_table_exists
SELECT to_regclass('outbox_schema_migrations') IS NOT NULL

-- name: migrations_version
SELECT coalesce(max(version), 0) FROM outbox_schema_migrations

-- name: migration_record
INSERT INTO outbox_schema_migrations (version, name) VALUES (%(version)s, %(name)s)

-- name: legacy_triggers_find
-- Triggers on jobs_variants, other than the product's own, that write job state: the legacy
-- aggregation trigger by name, or any trigger whose function updates jobs.
SELECT t.tgname, p.oid::regprocedure::text
FROM pg_trigger AS t
JOIN pg_proc AS p ON p.oid = t.tgfoid
WHERE t.tgrelid = to_regclass('jobs_variants')
  AND NOT t.tgisinternal
  AND t.tgname NOT LIKE 'outbox\_%%'
  AND (t.tgname = 'check_all_variants_done_trigger'
       OR p.prosrc ~* '\mupdate\s+("?\w+"?\.)?"?jobs"?\M')
ORDER BY t.tgname

-- name: demo_variant_update
-- The demo's "unchanged writer": plain SQL, captured by the trigger.
UPDATE jobs_variants
SET status = %(status)s, current_step = %(step)s, updated_at = now()
WHERE job_variants_id = %(variant_id)s

-- name: demo_jobs_summary
-- stuck: every variant is done at the final step, yet the job is not done (the original bug).
SELECT count(*) FILTER (WHERE j.status = 'done') AS done,
       count(*) FILTER (WHERE v.all_final AND j.status IS DISTINCT FROM 'done') AS stuck,
       count(*) AS total
FROM jobs AS j
JOIN LATERAL (
    SELECT bool_and(status = 'done' AND current_step = %(final_step)s) AS all_final
    FROM jobs_variants
    WHERE job_id = j.job_id
) AS v ON true
WHERE j.job_id = ANY(%(job_ids)s::uuid[])
