-- The schema's own bookkeeping (processor/migrate.py): which migrations a database has, the oldest
-- worker it serves, and the fold configuration `outbox migrate` sets (processor/fold_config.py).

-- name: migrations_table_create
CREATE TABLE IF NOT EXISTS outbox_schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: migrations_lock
-- One migrate at a time; released at commit.
SELECT pg_advisory_xact_lock(%(lock_class)s, %(key)s)

-- name: migrations_session_lock_try
-- The same key, for a session: a migration's prepare steps (several transactions) one migrate at a time.
SELECT pg_try_advisory_lock(%(lock_class)s, %(key)s)

-- name: migrations_session_unlock
SELECT pg_advisory_unlock(%(lock_class)s, %(key)s)

-- name: migrations_applied
SELECT version FROM outbox_schema_migrations ORDER BY version

-- name: migrations_table_exists
SELECT to_regclass('outbox_schema_migrations') IS NOT NULL AS exists

-- name: migrations_state
-- The database's schema version and the oldest worker version it serves (decision 0013): the
-- highest of what every applied migration serves (the column serves_workers_from, from 0014 on;
-- before, a migration served only workers of its own version), since a migration can never
-- re-admit a worker an earlier one stopped serving (its functions may be gone). Read through
-- to_jsonb so that it works before 0014 too.
SELECT coalesce(max(version), 0) AS version,
       coalesce(max(coalesce((to_jsonb(m) ->> 'serves_workers_from')::integer, version)), 0)
           AS serves_workers_from
FROM outbox_schema_migrations AS m

-- name: lock_timeout_set
-- For the session, the prepare steps of a migration (processor/migrate.py: prepare).
SELECT set_config('lock_timeout', %(timeout)s, false)

-- name: lock_timeout_reset
RESET lock_timeout

-- name: migration_record
INSERT INTO outbox_schema_migrations (version, name) VALUES (%(version)s, %(name)s)

-- name: migration_serves_record
-- From 0014 on (which adds the column): the oldest worker version this migration still serves.
UPDATE outbox_schema_migrations SET serves_workers_from = %(serves_workers_from)s WHERE version = %(version)s

-- name: fold_config_get
SELECT pipeline_steps, failure_policy, version FROM outbox_fold_config

-- name: fold_config_set
-- Under every checkpoint's lock (checkpoints_lock_all): the new configuration, its version on every
-- checkpoint (a worker folding with the old one notices when it next locks its checkpoint), and,
-- when it changed, every job queued to be folded again.
WITH changed AS (
    UPDATE outbox_fold_config
    SET pipeline_steps = %(steps)s::text[], failure_policy = %(policy)s, version = version + 1,
        changed_at = clock_timestamp()
    WHERE pipeline_steps IS DISTINCT FROM %(steps)s::text[] OR failure_policy <> %(policy)s
    RETURNING version, pipeline_steps IS NOT NULL AS was_set
), stamped AS (
    UPDATE outbox_checkpoints SET fold_config_version = (SELECT version FROM changed)
    WHERE EXISTS (SELECT FROM changed)
), queued AS (
    INSERT INTO outbox_dirty_jobs (partition, job_id)
    SELECT outbox_partition_of(job_id), job_id
    FROM (SELECT DISTINCT job_id FROM outbox_variant_states WHERE NOT removed) AS t
    WHERE %(refold)s AND EXISTS (SELECT FROM changed)
    ON CONFLICT (partition, job_id) DO UPDATE SET retry_at = NULL
    RETURNING 1
)
SELECT (SELECT version FROM changed) AS version, (SELECT count(*) FROM queued) AS jobs_queued

-- name: variant_steps_used
-- The steps jobs_variants uses, with how many variants each, for checking a pipeline.
SELECT current_step::text AS step, count(*) AS variants
FROM jobs_variants
WHERE current_step IS NOT NULL
GROUP BY current_step
ORDER BY count(*) DESC
