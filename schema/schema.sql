-- The outbox's schema as it is today, in one file: every table, index, sequence, function and
-- trigger the product installs, in its final form, grouped by concern. Read it top to bottom to
-- learn what the database does; read schema/migrations/ to learn how a database got here, and
-- docs/decisions/ to learn why.
--
-- How it is kept true. tests/integration/test_schema_file.py builds one database with `outbox
-- migrate` and one with this file (then `outbox migrate`, which applies no migration since the
-- file records them all, and writes what depends on the application's tables), and compares their
-- catalogs: columns, constraints, indexes, sequences, functions as pg_get_functiondef prints them,
-- triggers, owners and grants (after schema/roles.sql), the seeded rows and the recorded
-- migrations. A migration that changes the schema changes this file in the same commit.
--
-- Why `outbox migrate` stays the only install path (this file is not run by the product):
-- - most installs adopt a team's existing jobs and jobs_variants (their types, indexes, rows and
--   legacy trigger): migrate writes the cast functions for the columns' actual types, checks every
--   status and step fits, backfills one event per variant under the capture trigger's lock, and
--   removes a legacy writer of job state, in one transaction that a refusal rolls back whole;
-- - one path means a fresh install runs exactly what every database in the field has run, and the
--   migrations table it leaves is the one the next upgrade reads;
-- - a fresh install from every migration takes a fraction of a second.
-- The file is written so that it could run (in one transaction, on an empty or adopted database,
-- followed by `outbox migrate`): that is how the test builds its database.
--
-- Names: every object starts with outbox_ (House style: never collide with the application's).
-- The event limits (statuses, step length, payload size, partition count) are written as literals
-- where the SQL needs them (the writers' hot path is measured to the instruction); outbox/limits.py
-- owns their values, and tests/integration/test_limits.py checks every literal the database has
-- against it (decision 0014).


-- ============================================================================================
-- The schema's own version
-- ============================================================================================

-- One row per migration applied (processor/migrate.py). A worker of version W runs on a database
-- whose newest migration is at least W and whose every migration still serves W (the highest
-- serves_workers_from <= W: none re-admits a worker an earlier one stopped serving): a migration
-- need not stop the workers already running (decision 0013, processor/migrate.py: check_window).
-- Hence the versioned names of the functions a worker calls by name (outbox_event_decode_v1, ...):
-- a migration that changes one creates the next version beside it, and drops the old one only
-- with a serves_workers_from that leaves out the workers calling it.
CREATE TABLE IF NOT EXISTS outbox_schema_migrations (
    version             integer PRIMARY KEY,
    name                text NOT NULL,
    applied_at          timestamptz NOT NULL DEFAULT now(),
    serves_workers_from integer  -- the oldest worker version this migration serves (NULL: only its own)
);


-- ============================================================================================
-- The application's tables
-- ============================================================================================

-- Created when missing, adopted when present: existing ones keep their names, columns, types and
-- rows. The product reads and writes status and current_step through the cast functions below
-- (outbox_job_status, ...), which `outbox migrate` writes for the columns' actual types.
CREATE TABLE IF NOT EXISTS jobs (
    job_id       uuid PRIMARY KEY,
    status       text,
    current_step text,
    updated_at   timestamptz
);

CREATE TABLE IF NOT EXISTS jobs_variants (
    job_variants_id uuid PRIMARY KEY,
    job_id          uuid REFERENCES jobs,
    status          text,
    current_step    text,
    updated_at      timestamptz
);

-- The fold looks up all variants of a job. A btree index of the application's that leads with
-- job_id serves, and is used instead of a second one (each index costs every writer an insert).
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT FROM pg_index
        WHERE indrelid = 'jobs_variants'::regclass
          AND indkey[0] = (SELECT attnum FROM pg_attribute WHERE attrelid = 'jobs_variants'::regclass AND attname = 'job_id')
          AND indpred IS NULL AND indisvalid
          AND (SELECT relam FROM pg_class WHERE oid = indexrelid) = (SELECT oid FROM pg_am WHERE amname = 'btree')
    ) THEN
        CREATE INDEX outbox_jobs_variants_job_id_idx ON jobs_variants (job_id);
    END IF;
END
$$;

-- The casts of the application's column types. Text here; `outbox migrate` writes them again for
-- the actual columns (an enum, a domain, varchar(n): processor/app_schema.py). Single-expression
-- SQL functions, so the planner inlines them into the statements that write those columns.
CREATE FUNCTION outbox_job_status(p text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT p $$;
CREATE FUNCTION outbox_job_step(p text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT p $$;
CREATE FUNCTION outbox_variant_status(p text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT p $$;
CREATE FUNCTION outbox_variant_step(p text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT p $$;


-- ============================================================================================
-- The outbox: events, appended in the writer's transaction
-- ============================================================================================

-- Append-only on the hot path. txid is the writing transaction's id: the processor applies the
-- events of the transactions that committed between two snapshots (docs/design.md, "Ordering"), so
-- an event whose transaction commits late is applied with the snapshot that first sees it, never
-- skipped. trace_parent is the writer's W3C trace context (outbox.traceparent), NULL for plain SQL.
-- No CHECK on the payload: a CHECK's expression is compiled again for every INSERT statement
-- (decision 0004); the payload bound is outbox_payload_fits, below.
-- Partitioned into segments (see "Segments", below): writers append to the current one, retention
-- truncates whole ones. segment is the only column a writer never names.
CREATE FUNCTION outbox_events_segment() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$SELECT 1::smallint$$;

CREATE TABLE outbox_events (
    event_id        bigint GENERATED ALWAYS AS IDENTITY,
    txid            xid8 NOT NULL DEFAULT pg_current_xact_id(),
    partition       integer NOT NULL DEFAULT 0,
    event_type      text NOT NULL,
    schema_version  integer NOT NULL,
    job_id          uuid,
    variant_id      uuid,
    variant_version bigint,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    trace_parent    text,
    segment         smallint NOT NULL DEFAULT outbox_events_segment(),
    PRIMARY KEY (event_id, segment)
) PARTITION BY LIST (segment);

-- The drain's range read: a partition's events in (txid, event_id) order (in each segment; the
-- planner merges them).
CREATE INDEX outbox_events_position_idx ON outbox_events (partition, txid, event_id);

-- Replay reads the events of given variants. One index, not two (job and variant): each costs
-- every writer an insert.
CREATE INDEX outbox_events_variant_id_idx ON outbox_events (variant_id);

-- Per-variant versions, taken by capture while the writer holds the variant's row lock: a later
-- change of the same variant waits for that lock, so it takes a higher number. A variant's
-- versions therefore increase in the order its changes commit, across a delete and re-insert too.
CREATE SEQUENCE outbox_variant_versions AS bigint;


-- ============================================================================================
-- Partitions: a job's events share one partition, each partition has one worker at a time
-- ============================================================================================

-- The partition count. Changed only by `outbox repartition`, which waits for a drained outbox
-- while writers are held back: events are never routed by a count the checkpoints do not have.
CREATE TABLE outbox_partitioning (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    partitions integer NOT NULL DEFAULT 1 CHECK (partitions BETWEEN 1 AND 1024),
    changed_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO outbox_partitioning DEFAULT VALUES;

-- A job's partition. Its body holds the count (`outbox repartition` rewrites it through
-- outbox_partitions_set): IMMUTABLE, inlined, no table read per event, and replacing it
-- invalidates the writers' cached plans. With one partition it is the constant 0.
CREATE FUNCTION outbox_partition_of(p_job_id uuid) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 0 $$;

-- The hash: the first 32 bits of md5 of the job id's text, modulo the count. Stable across
-- PostgreSQL versions and platforms, uniform for any UUID, and easy to compute elsewhere:
-- int(hashlib.md5(str(job_id).encode()).hexdigest()[:8], 16) % partitions.
CREATE FUNCTION outbox_partition_hash(p_job_id uuid, p_partitions integer) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN p_partitions = 1 THEN 0
                ELSE ((('x' || substr(md5(p_job_id::text), 1, 8))::bit(32)::bigint) % p_partitions)::integer END
$$;

-- Called only by `outbox repartition`, inside its transaction.
CREATE FUNCTION outbox_partitions_set(p_partitions integer) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE outbox_partitioning SET partitions = p_partitions, changed_at = now();
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION outbox_partition_of(p_job_id uuid) RETURNS integer '
        'LANGUAGE sql IMMUTABLE PARALLEL SAFE AS %L',
        format('SELECT outbox_partition_hash(p_job_id, %s)', p_partitions));
END
$$;


-- ============================================================================================
-- Reading an event: the payload bound and what the drain makes of one event
-- ============================================================================================

-- The bound on what the processor reads of an event: its payload as JSON text takes at most 65,536
-- bytes; over it, a dead letter whose payload never reaches the worker. The cheap first test
-- settles every event capture writes (an uncompressed jsonb of at most 10,000 bytes is at most 6
-- times that as text). STABLE, as pg_column_size is, so that the planner inlines it (decision 0004).
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

-- What the drain, replay's rebuild and prune's baseline make of one event, decided once
-- (processor/decode.py makes the same decision in Python, with the reason, for the events this
-- leaves unreadable). Readable: a known shape, with a job, a variant, and a version capture issued
-- (at most the sequence's last value, read once per statement by the caller). A set-returning SQL
-- function, so the planner inlines it into the drain statement.
CREATE FUNCTION outbox_event_decode_v1(
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

-- The highest version capture has issued so far (0 before the first).
CREATE FUNCTION outbox_versions_issued_v1() RETURNS bigint
LANGUAGE sql VOLATILE
AS $$ SELECT coalesce(pg_sequence_last_value('outbox_variant_versions'), 0) $$;

-- What a variant's state says when its newest event cannot be read: processor/decode.py's words.
CREATE FUNCTION outbox_unreadable_problem_v1(p_event_id bigint, p_reason text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT format('event %s is a dead letter: %s', p_event_id, coalesce(p_reason, 'it cannot be read')) $$;


-- ============================================================================================
-- Capture: every change of a variant appends an event in the writer's own transaction
-- ============================================================================================
--
-- For every writer (plain SQL and outbox.update_variant alike): each INSERT, DELETE, and UPDATE
-- that changes a variant's status, step, job or id appends an event. Capture never reads other
-- variants and never writes jobs: the processor alone computes job state, so concurrent commits
-- cannot hide each other's changes. AFTER ROW triggers see the row as finally written (after every
-- BEFORE trigger) and fire only for rows really written.
--
-- The rules, in the order the update trigger applies them:
-- 1. the common shape (same job and id, a valid status, a step that fits, a new status or step,
--    the transaction's first capture) appends its event in one expression (decision 0005);
-- 2. nothing folded changed (updated_at only): nothing is appended;
-- 3. a status outside queued/running/done/failed, or a step over 65,000 bytes, is refused;
-- 4. a variant that leaves its job (deleted, new id, detached, moved) appends variant_removed for
--    the job it left, in that job's partition;
-- 5. a variant with a job appends variant_changed; the transaction's later captures append the
--    row as it is now, so the newest version carries the row's state at commit (decision 0006).
-- The validation is written out in each trigger function rather than in a shared one: a nested
-- PL/pgSQL call costs about 19,000 instructions per writer transaction (decision 0004).

-- The one place that shapes a variant event (the backfill, `verify --repair` and capture's rarer
-- paths append through it; the update trigger's common path writes the same row itself, checked by
-- tests/integration/test_capture.py). PL/pgSQL, so its INSERT is planned once per session.
CREATE FUNCTION outbox_append_variant_event(
    p_event_type text, p_job_id uuid, p_variant_id uuid, p_status text, p_step text
) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO outbox_events
        (event_type, schema_version, partition, job_id, variant_id, variant_version, payload, trace_parent)
    VALUES (
        p_event_type, 1, outbox_partition_of(p_job_id), p_job_id, p_variant_id,
        nextval('outbox_variant_versions'),
        CASE WHEN p_event_type = 'variant_changed'
             THEN jsonb_build_object('status', p_status, 'step', p_step)
             ELSE '{}'::jsonb END,
        nullif(current_setting('outbox.traceparent', true), '')
    );
END
$$;

-- Refuses what the processor could never fold (a status) or an event must not carry (a step over
-- 65,000 bytes); called only when one of them is wrong, and holds the one copy of the messages.
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

-- Rule 5: the first capture of a transaction appends the change as written; every later capture
-- appends the rows as they are now (outbox.captured marks that a capture happened).
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

-- Inserts and deletes.
CREATE FUNCTION outbox_capture_variant_change() RETURNS trigger
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

CREATE TRIGGER outbox_capture_variant_insert_delete
    AFTER INSERT OR DELETE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION outbox_capture_variant_change();

-- Updates, the writers' hot path. No WHEN clause: PostgreSQL compiles a trigger's WHEN clause again
-- for every statement, dearer than the same test inside the function (decision 0004).
CREATE FUNCTION outbox_capture_variant_update() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.job_id = OLD.job_id AND NEW.job_variants_id = OLD.job_variants_id
       AND NEW.status::text IN ('queued', 'running', 'done', 'failed')
       AND coalesce(octet_length(NEW.current_step::text), 0) <= 65000
       AND (NEW.status IS DISTINCT FROM OLD.status OR NEW.current_step IS DISTINCT FROM OLD.current_step)
       AND current_setting('outbox.captured', true) IS DISTINCT FROM 'on'
       AND set_config('outbox.captured', 'on', true) = 'on' THEN
        INSERT INTO outbox_events
            (event_type, schema_version, partition, job_id, variant_id, variant_version, payload, trace_parent)
        VALUES (
            'variant_changed', 1, outbox_partition_of(NEW.job_id), NEW.job_id, NEW.job_variants_id,
            nextval('outbox_variant_versions'),
            jsonb_object(ARRAY['status', NEW.status::text, 'step', NEW.current_step::text]),
            nullif(current_setting('outbox.traceparent', true), '')
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

CREATE TRIGGER outbox_capture_variant_update
    AFTER UPDATE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION outbox_capture_variant_update();

-- Adoption: one event per existing variant, carrying its current state, so that the processor's
-- first run computes every existing job (stuck ones included). The capture trigger's lock, held
-- until commit, keeps writers out between its creation and this read: nothing missed, nothing
-- twice. A variant with a status capture would refuse becomes a dead letter and flags its job.
SELECT outbox_append_variant_event('variant_changed', job_id, job_variants_id, status::text, current_step::text)
FROM jobs_variants
WHERE job_id IS NOT NULL
ORDER BY job_id, job_variants_id;

-- The optional NOTIFY wake-up (OUTBOX_WAKEUP=notify): functions only, until an operator runs
-- `outbox migrate --wakeup notify`. A NOTIFY makes writers commit one at a time, which is why
-- polling stays the default. One notification per writing transaction (PostgreSQL folds identical
-- ones), delivered at commit; statement-level, so a bulk update notifies once.
CREATE FUNCTION outbox_wakeup_notify() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('outbox_wakeup', '');
    RETURN NULL;
END
$$;

CREATE FUNCTION outbox_wakeup_enable() RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    CREATE OR REPLACE TRIGGER outbox_wakeup_notify
        AFTER INSERT OR UPDATE OR DELETE ON jobs_variants
        FOR EACH STATEMENT EXECUTE FUNCTION outbox_wakeup_notify();
END
$$;

CREATE FUNCTION outbox_wakeup_disable() RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    DROP TRIGGER IF EXISTS outbox_wakeup_notify ON jobs_variants;
END
$$;


-- ============================================================================================
-- The processor's position: one checkpoint per partition
-- ============================================================================================

-- Written in the same transaction as the job state it covers: that is what makes each event take
-- effect exactly once.
--   done_snapshot: every event of a transaction visible in it has been applied.
--   target_snapshot: the snapshot a catch-up in several batches is reaching; NULL otherwise.
--   last_txid, last_event_id: within that catch-up, the last event applied, in (txid, event_id) order.
--   cluster_id: the cluster whose transaction ids the snapshots refer to (a restore into another
--     cluster is detected by a change: processor/rebase.py).
--   fold_config_version: the fold configuration this partition folds with (outbox_fold_config).
-- Free space per page keeps the once-per-batch update HOT.
CREATE TABLE outbox_checkpoints (
    partition             integer PRIMARY KEY,
    done_snapshot         pg_snapshot NOT NULL DEFAULT '1:1:',
    target_snapshot       pg_snapshot,
    last_txid             xid8 NOT NULL DEFAULT '0',
    last_event_id         bigint NOT NULL DEFAULT 0,
    events_applied        bigint NOT NULL DEFAULT 0,
    updated_at            timestamptz,
    last_applied_event_id bigint,
    last_applied_at       timestamptz,
    cluster_id            bigint,
    rebase_pending        boolean NOT NULL DEFAULT false,
    fold_config_version   integer NOT NULL DEFAULT 0
) WITH (fillfactor = 50);

INSERT INTO outbox_checkpoints (partition) VALUES (0);

-- Whether an event is applied, given a checkpoint's cursor (processor/snapshot.py). A
-- single-expression SQL function, so the planner inlines it.
CREATE FUNCTION outbox_event_applied_v1(
    p_txid xid8, p_event_id bigint,
    p_done pg_snapshot, p_target pg_snapshot, p_after_txid xid8, p_after_event_id bigint
) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT pg_visible_in_snapshot(p_txid, p_done)
           OR (p_target IS NOT NULL
               AND pg_visible_in_snapshot(p_txid, p_target)
               AND (p_txid, p_event_id) <= (p_after_txid, p_after_event_id))
$$;

-- What "pending" means, once: an event is pending until its transaction is visible in its
-- partition's done snapshot. `outbox backlog`, `verify`, `repartition`, the metrics and the tests
-- read it here; inlined, so each partition's part is one range read of the position index.
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

-- Jobs whose fold is deferred: touched by a catch-up that spans several batches (folded once it is
-- whole, so every job state is the fold of one committed snapshot), or whose row the application
-- held locked (retried at retry_at; the worker never waits for it). queued_at: the oldest change
-- each waits to show (`outbox backlog` reports it as lag).
CREATE TABLE outbox_dirty_jobs (
    partition integer NOT NULL,
    job_id    uuid NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    retry_at  timestamptz,
    PRIMARY KEY (partition, job_id)
);

-- Jobs whose state cannot be computed (a step missing from the pipeline, an unusable event):
-- their state in jobs is left as it was rather than guessed.
CREATE TABLE outbox_job_flags (
    job_id     uuid PRIMARY KEY,
    reason     text NOT NULL,
    flagged_at timestamptz NOT NULL DEFAULT now()
);


-- ============================================================================================
-- Variant states: the newest state of each variant, as folded from events
-- ============================================================================================

-- removed marks a deleted variant (a tombstone, so that an older change processed after the delete
-- cannot bring it back); problem says why its newest event could not be used; moved_from, set by
-- the merge, is the job a variant left (only meaningful in the merge's RETURNING). Free space per
-- page keeps the common update HOT (job_id and variant_id do not change).
CREATE TABLE outbox_variant_states (
    variant_id uuid PRIMARY KEY,
    job_id     uuid NOT NULL,
    version    bigint NOT NULL,
    status     text,
    step       text,
    removed    boolean NOT NULL DEFAULT false,
    problem    text,
    event_id   bigint NOT NULL,
    moved_from uuid
) WITH (fillfactor = 50);

CREATE INDEX outbox_variant_states_job_id_idx ON outbox_variant_states (job_id);

-- The fold of the events `outbox prune` removed: per variant, the newest state they gave. Replay
-- starts from here, so a replay after pruning gives the same state as one before.
CREATE TABLE outbox_variant_baseline (
    variant_id uuid NOT NULL,
    job_id     uuid NOT NULL,
    version    bigint NOT NULL,
    status     text,
    step       text,
    removed    boolean NOT NULL DEFAULT false,
    problem    text,
    event_id   bigint NOT NULL,
    PRIMARY KEY (variant_id)
);

CREATE INDEX outbox_variant_baseline_job_id_idx ON outbox_variant_baseline (job_id);

-- "The newest state of a variant": the highest version, then the highest event id. The merge into
-- the states, prune's baseline, the drain and replay's rebuild all go through these functions.
CREATE FUNCTION outbox_state_newer(p_version bigint, p_event_id bigint, p_than_version bigint, p_than_event_id bigint)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT (p_version, p_event_id) > (p_than_version, p_than_event_id) $$;

CREATE FUNCTION outbox_variant_states_newest(p_states outbox_variant_states[])
RETURNS SETOF outbox_variant_states
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT DISTINCT ON (variant_id) *
    FROM unnest(p_states)
    ORDER BY variant_id, version DESC, event_id DESC
$$;

CREATE FUNCTION outbox_variant_states_merge_v1(p_states outbox_variant_states[])
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

CREATE FUNCTION outbox_variant_baseline_merge(p_states outbox_variant_states[])
RETURNS bigint
LANGUAGE sql
AS $$
    WITH merged AS (
        INSERT INTO outbox_variant_baseline AS b (variant_id, job_id, version, status, step, removed, problem, event_id)
        SELECT n.variant_id, n.job_id, n.version, n.status, n.step, n.removed, n.problem, n.event_id
        FROM outbox_variant_states_newest(p_states) AS n
        WHERE NOT EXISTS (SELECT FROM outbox_variant_baseline AS o
                          WHERE o.variant_id = n.variant_id
                            AND NOT outbox_state_newer(n.version, n.event_id, o.version, o.event_id))
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


-- ============================================================================================
-- Dead letters: events that cannot be applied, parked so that later events keep flowing
-- ============================================================================================

-- Parked in the transaction that moves the checkpoint past them. discarded_at: `outbox dead-letters
-- discard` keeps the record, and replay skips the event. holds_job: the dead letter has no
-- trustworthy place in its variant's order, so its job is flagged until it is retried or discarded.
CREATE TABLE outbox_dead_letters (
    event_id     bigint PRIMARY KEY,
    partition    integer NOT NULL,
    job_id       uuid,
    variant_id   uuid,
    reason       text NOT NULL,
    parked_at    timestamptz NOT NULL DEFAULT now(),
    discarded_at timestamptz,
    holds_job    boolean NOT NULL DEFAULT false
);

CREATE INDEX outbox_dead_letters_job_id_idx ON outbox_dead_letters (job_id);
CREATE INDEX outbox_dead_letters_holding_idx ON outbox_dead_letters (job_id) WHERE holds_job AND discarded_at IS NULL;


-- ============================================================================================
-- The fold configuration: every worker and operation folds with the same one
-- ============================================================================================

-- Set by `outbox migrate`, changed by `outbox pipeline set` (which folds every job again and
-- stamps the new version on every checkpoint, so that a worker holding an older one notices).
CREATE TABLE outbox_fold_config (
    only_row       boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    pipeline_steps text[] CHECK (cardinality(pipeline_steps) >= 1),  -- NULL until `outbox migrate` sets it
    failure_policy text NOT NULL DEFAULT 'settled' CHECK (failure_policy IN ('settled', 'immediate')),
    version        integer NOT NULL DEFAULT 0,
    changed_at     timestamptz
);

INSERT INTO outbox_fold_config DEFAULT VALUES;


-- ============================================================================================
-- Job state belongs to the processor
-- ============================================================================================

-- Any other write of jobs.status or jobs.current_step (a legacy aggregation trigger, a support
-- tool's UPDATE) would be undone silently by the next fold; it is refused in the transaction that
-- tries it. The processor says who it is in a setting local to its transaction (its token,
-- processor:13: processor/store/jobs.sql, jobs_write), and so does a hold. The token names what a
-- worker writes with job state (transitions, their trace context), not the schema version: it changes
-- only with a migration that stops serving the workers writing the old way (decision 0013). An AFTER ROW trigger sees
-- the row every BEFORE trigger has made; with no column list, the columns' types can still change.
CREATE FUNCTION outbox_guard_job_state() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF OLD.status IS NOT DISTINCT FROM NEW.status AND OLD.current_step IS NOT DISTINCT FROM NEW.current_step THEN
        RETURN NULL;
    END IF;
    IF current_setting('outbox.job_writer', true) IN ('processor:13', 'hold') THEN
        RETURN NULL;
    END IF;
    IF current_setting('outbox.job_writer', true) IN ('processor', 'processor:12') THEN
        RAISE EXCEPTION 'this outbox worker is older than the database''s schema (migration 0013): upgrade it'
            USING ERRCODE = 'restrict_violation',
                  HINT = 'A worker must run the version that migrated the database: stop the old workers, start new ones.';
    END IF;
    RAISE EXCEPTION 'jobs.status and jobs.current_step of job % are written by the outbox processor only', OLD.job_id
        USING ERRCODE = 'restrict_violation',
              HINT = 'They follow the job''s variants: change jobs_variants instead. To set a job''s state '
                     'yourself (a cancel), hold it: SELECT outbox_hold_job(job_id, status, step, reason), '
                     'or outbox.hold_job() in Python. A trigger that writes job state from its variants is a '
                     'legacy one: drop it.';
END
$$;

CREATE TRIGGER outbox_guard_job_state
    AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN (current_setting('outbox.job_writer', true) IS DISTINCT FROM 'processor:13')
    EXECUTE FUNCTION outbox_guard_job_state();

-- Holds: a job whose state the application sets itself (a support "cancel"). The processor leaves
-- a held job's row alone until the hold is released, then folds it from its variants again.
CREATE TABLE outbox_job_holds (
    job_id       uuid PRIMARY KEY,
    status       text NOT NULL,
    current_step text,
    reason       text NOT NULL,
    held_at      timestamptz NOT NULL DEFAULT now()
);

-- Written through these two functions, with the owner's rights, so that the writer role needs no
-- right on the columns the processor owns. A hold stages its transition (published below).
CREATE FUNCTION outbox_hold_job(p_job_id uuid, p_status text, p_step text, p_reason text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT
AS $$
DECLARE
    before record;
    after record;
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('queued', 'running', 'done', 'failed') THEN
        RAISE EXCEPTION 'a job''s status must be one of queued, running, done, failed (got %)',
            coalesce(quote_literal(p_status), 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF coalesce(p_reason, '') = '' THEN
        RAISE EXCEPTION 'a hold needs a reason' USING ERRCODE = 'check_violation';
    END IF;
    SELECT status::text AS status, current_step::text AS step INTO before
    FROM jobs WHERE job_id = p_job_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no job with id %', p_job_id USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO outbox_job_holds AS h (job_id, status, current_step, reason)
    VALUES (p_job_id, p_status, p_step, p_reason)
    ON CONFLICT (job_id) DO UPDATE
        SET status = excluded.status, current_step = excluded.current_step, reason = excluded.reason,
            held_at = now();
    PERFORM set_config('outbox.job_writer', 'hold', true);
    UPDATE jobs
    SET status = outbox_job_status(p_status), current_step = outbox_job_step(p_step), updated_at = now()
    WHERE job_id = p_job_id
    RETURNING status::text AS status, current_step::text AS step INTO after;
    PERFORM set_config('outbox.job_writer', '', true);
    IF (before.status, before.step) IS DISTINCT FROM (after.status, after.step) THEN
        INSERT INTO outbox_job_transitions_staged (job_id, from_status, from_step, to_status, to_step)
        VALUES (p_job_id, before.status, before.step, after.status, after.step);
    END IF;
END
$$;

CREATE FUNCTION outbox_release_job(p_job_id uuid) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT
AS $$
BEGIN
    DELETE FROM outbox_job_holds WHERE job_id = p_job_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO outbox_dirty_jobs (partition, job_id) VALUES (outbox_partition_of(p_job_id), p_job_id)
    ON CONFLICT (partition, job_id) DO UPDATE SET retry_at = NULL;
    RETURN true;
END
$$;


-- ============================================================================================
-- Job transitions and the subscriptions that follow them
-- ============================================================================================

-- Every change of a job's (status, current_step), appended in the transaction that writes it.
-- Transactions that append transitions take outbox_transitions_lock first, so they commit in the
-- order of their ids: a reader that sees a transition sees every lower id, and one number is a
-- complete position for every partition at once (decision 0007).
CREATE FUNCTION outbox_job_transitions_segment() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$SELECT 1::smallint$$;

CREATE TABLE outbox_job_transitions (
    transition_id   bigint GENERATED ALWAYS AS IDENTITY,
    job_id          uuid NOT NULL,
    partition       integer NOT NULL,
    from_status     text,  -- NULL only where the row had none (an adopted table's NULL status)
    from_step       text,
    to_status       text NOT NULL,
    to_step         text,
    written_by      text NOT NULL CHECK (written_by IN ('processor', 'hold')),
    transitioned_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    trace_parent    text,  -- the trace context of the event that caused it
    segment         smallint NOT NULL DEFAULT outbox_job_transitions_segment(),  -- see "Segments"
    PRIMARY KEY (transition_id, segment)
) PARTITION BY LIST (segment);
CREATE INDEX outbox_job_transitions_job ON outbox_job_transitions (job_id, transition_id);

-- The lock that orders transitions: the product's advisory lock class
-- (processor.store.CONSUMER_LOCK_CLASS); -1 and -2 are migrate's and repartition's.
CREATE FUNCTION outbox_transitions_lock() RETURNS boolean
LANGUAGE sql VOLATILE
AS $$ SELECT pg_advisory_xact_lock(185359889, -3) IS NOT NULL $$;

-- A subscription: a name and how far it acknowledged; to_statuses filters (NULL: every transition).
CREATE TABLE outbox_subscriptions (
    name            text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    position        bigint NOT NULL CHECK (position >= 0),
    to_statuses     text[] CHECK (to_statuses <@ ARRAY['queued', 'running', 'done', 'failed']),
    created_at      timestamptz NOT NULL DEFAULT now(),
    acknowledged_at timestamptz
);

-- Transitions a handler failed on: retried with backoff while parked_at is NULL (the subscription
-- waits at it, in order), then parked once the attempts are spent.
CREATE TABLE outbox_subscription_failures (
    subscription  text NOT NULL REFERENCES outbox_subscriptions (name) ON DELETE CASCADE ON UPDATE CASCADE,
    transition_id bigint NOT NULL,
    attempts      integer NOT NULL,
    last_error    text NOT NULL,
    failed_at     timestamptz NOT NULL DEFAULT now(),
    parked_at     timestamptz,
    PRIMARY KEY (subscription, transition_id)
);

-- A hold's transition, staged by the application's transaction (which must never take the lock
-- above: an open application transaction would stall every worker) and published by the processor.
CREATE TABLE outbox_job_transitions_staged (
    staged_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id          uuid NOT NULL,
    from_status     text,
    from_step       text,
    to_status       text NOT NULL,
    to_step         text,
    transitioned_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION outbox_transitions_publish_v1() RETURNS bigint
LANGUAGE sql VOLATILE
AS $$
    WITH staged AS (
        DELETE FROM outbox_job_transitions_staged
        WHERE outbox_transitions_lock()
        RETURNING *
    ), published AS (
        INSERT INTO outbox_job_transitions
            (job_id, partition, from_status, from_step, to_status, to_step, written_by, transitioned_at)
        SELECT job_id, outbox_partition_of(job_id), from_status, from_step, to_status, to_step, 'hold', transitioned_at
        FROM (SELECT * FROM staged ORDER BY staged_id) AS s
        RETURNING 1
    )
    SELECT count(*) FROM published
$$;



-- ============================================================================================
-- Segments: retention truncates whole partitions of the outbox and of the transitions
-- ============================================================================================
--
-- outbox_events and outbox_job_transitions are partitioned by segment. Writers append to the
-- current segment, whose number outbox_events_segment() / outbox_job_transitions_segment() hold
-- as a constant; `outbox prune` and OUTBOX_RETENTION (processor/retention.py) close it and open the
-- next (outbox_segments_rotate), and truncate a closed segment once every row in it may go, which
-- leaves no dead tuple, costs a few kilobytes of WAL, and takes no lock a writer waits for
-- (decision 0015). A truncated segment is free: the next rotation reuses it.

-- The segments of each segmented table. Free: empty, ready to be the next current one (opened_at
-- NULL). Current: the one writers append to (closed_at NULL). Closed: writers moved on; retention
-- truncates it once its every row may go, and it is free again.
CREATE TABLE outbox_segments (
    relation  text NOT NULL CHECK (relation IN ('outbox_events', 'outbox_job_transitions')),
    segment   smallint NOT NULL CHECK (segment >= 0),
    opened_at timestamptz,
    closed_at timestamptz CHECK (closed_at IS NULL OR opened_at IS NOT NULL),
    PRIMARY KEY (relation, segment)
);

CREATE UNIQUE INDEX outbox_segments_current ON outbox_segments (relation) WHERE opened_at IS NOT NULL AND closed_at IS NULL;

-- A new segment: a table like its parent, attached (SHARE UPDATE EXCLUSIVE on the parent: writers
-- and readers go on; CREATE TABLE ... PARTITION OF would take ACCESS EXCLUSIVE).
CREATE FUNCTION outbox_segment_create(p_relation text, p_segment smallint) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_name constant text := format('%s_s%s', p_relation, p_segment);
BEGIN
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE '
                   'INCLUDING COMPRESSION)', v_name, p_relation);
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES IN (%s)', p_relation, v_name, p_segment);
    INSERT INTO outbox_segments (relation, segment) VALUES (p_relation, p_segment);
END
$$;

-- Writers move to the next segment: a free one, or a new one. With the owner's rights (DDL), so
-- that the processor's role needs none. Returns the new current segment.
CREATE FUNCTION outbox_segments_rotate(p_relation text) RETURNS smallint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT
AS $$
DECLARE
    v_next smallint;
BEGIN
    -- One rotation or truncation at a time, whoever runs it (workers, `outbox prune`).
    LOCK TABLE outbox_segments IN SHARE ROW EXCLUSIVE MODE;
    SELECT segment INTO v_next FROM outbox_segments
    WHERE relation = p_relation AND opened_at IS NULL ORDER BY segment LIMIT 1;
    IF NOT FOUND THEN
        SELECT coalesce(max(segment) + 1, 0) INTO v_next FROM outbox_segments WHERE relation = p_relation;
        PERFORM outbox_segment_create(p_relation, v_next);
    END IF;
    UPDATE outbox_segments SET closed_at = clock_timestamp()
    WHERE relation = p_relation AND opened_at IS NOT NULL AND closed_at IS NULL;
    UPDATE outbox_segments SET opened_at = clock_timestamp() WHERE relation = p_relation AND segment = v_next;
    EXECUTE format('CREATE OR REPLACE FUNCTION %I() RETURNS smallint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS %L',
                   p_relation || '_segment', format('SELECT %s::smallint', v_next));
    RETURN v_next;
END
$$;

-- A closed segment of events goes, whole, when every event in it is applied and was folded into
-- the baseline by `outbox prune` (processor/retention.py) from a snapshot that saw it (p_folded).
-- Checked here under the segment's ACCESS EXCLUSIVE lock, where no row can come or go: the rule
-- lives in this one place. Every checkpoint is locked first, in partition order (as replay and
-- the other operations do): a worker's batch or a replay that reads the segment finishes before,
-- and starts after, with the baseline already holding what the segment held. The caller sets
-- lock_timeout: a session that has read the outbox and stays in its transaction makes this wait,
-- and everything queued behind it too. Returns NULL when truncated, else why not.
CREATE FUNCTION outbox_events_segment_truncate(p_segment smallint, p_folded pg_snapshot) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT
AS $$
DECLARE
    v_name constant text := format('outbox_events_s%s', p_segment);
BEGIN
    LOCK TABLE outbox_segments IN SHARE ROW EXCLUSIVE MODE;
    IF NOT EXISTS (SELECT FROM outbox_segments WHERE relation = 'outbox_events' AND segment = p_segment
                   AND closed_at IS NOT NULL) THEN
        RETURN 'not a closed segment';
    END IF;
    PERFORM FROM outbox_checkpoints ORDER BY partition FOR UPDATE;
    -- With every checkpoint held, no worker reads the segment: what still holds it is a statement
    -- (explain, backlog: a moment) or a transaction left open (then the next round tries again).
    -- The workers wait for this transaction: it must not wait long.
    PERFORM set_config('lock_timeout', '50ms', true);
    EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', v_name);
    -- Each partition's part is one range read of the position index from its done snapshot's xmin.
    IF EXISTS (SELECT FROM outbox_events AS e
               WHERE e.segment = p_segment
                 AND NOT EXISTS (SELECT FROM outbox_checkpoints AS c WHERE c.partition = e.partition)) THEN
        RETURN 'it holds events of a partition with no checkpoint';
    END IF;
    IF EXISTS (SELECT FROM outbox_checkpoints AS c
               CROSS JOIN LATERAL (
                   SELECT FROM outbox_events AS e
                   WHERE e.segment = p_segment AND e.partition = c.partition
                     AND e.txid >= least(pg_snapshot_xmin(c.done_snapshot), pg_snapshot_xmin(p_folded))
                     AND (NOT pg_visible_in_snapshot(e.txid, c.done_snapshot)
                          OR NOT pg_visible_in_snapshot(e.txid, p_folded))
                   LIMIT 1) AS x) THEN
        RETURN 'events were written to it since it was folded, or are not applied yet';
    END IF;
    IF EXISTS (SELECT FROM outbox_dead_letters AS d
               JOIN outbox_events AS e ON e.event_id = d.event_id AND e.segment = p_segment
               WHERE d.discarded_at IS NULL) THEN
        RETURN 'a dead letter in it waits to be retried or discarded';
    END IF;
    EXECUTE format('TRUNCATE %I', v_name);
    -- Discarded dead letters whose event is gone: nothing reads them without it.
    DELETE FROM outbox_dead_letters AS d
    WHERE d.discarded_at IS NOT NULL AND NOT EXISTS (SELECT FROM outbox_events AS e WHERE e.event_id = d.event_id);
    UPDATE outbox_segments SET opened_at = NULL, closed_at = NULL
    WHERE relation = 'outbox_events' AND segment = p_segment;
    RETURN NULL;
END
$$;

-- A closed segment of transitions goes, whole, when every transition in it is older than the
-- cutoff, acknowledged by every subscription (at or below its position) and failed by none. The
-- transitions' lock first: a worker appending transitions holds it until it commits.
CREATE FUNCTION outbox_job_transitions_segment_truncate(p_segment smallint, p_cutoff timestamptz) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT
AS $$
DECLARE
    v_name constant text := format('outbox_job_transitions_s%s', p_segment);
    v_newest bigint;
BEGIN
    LOCK TABLE outbox_segments IN SHARE ROW EXCLUSIVE MODE;
    IF NOT EXISTS (SELECT FROM outbox_segments WHERE relation = 'outbox_job_transitions' AND segment = p_segment
                   AND closed_at IS NOT NULL) THEN
        RETURN 'not a closed segment';
    END IF;
    PERFORM outbox_transitions_lock();
    -- Workers appending transitions wait for this transaction: it must not wait long.
    PERFORM set_config('lock_timeout', '50ms', true);
    EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', v_name);
    SELECT max(transition_id) INTO v_newest FROM outbox_job_transitions WHERE segment = p_segment;
    IF v_newest IS NULL THEN
        NULL;  -- empty: free it
    ELSIF EXISTS (SELECT FROM outbox_subscriptions WHERE position < v_newest) THEN
        RETURN 'a subscription has not acknowledged every transition in it';
    ELSIF EXISTS (SELECT FROM outbox_subscription_failures AS f
                  JOIN outbox_job_transitions AS t ON t.transition_id = f.transition_id AND t.segment = p_segment) THEN
        RETURN 'a subscription failed on a transition in it';
    ELSIF EXISTS (SELECT FROM outbox_job_transitions WHERE segment = p_segment AND transitioned_at >= p_cutoff) THEN
        RETURN 'it holds transitions younger than the cutoff';
    END IF;
    EXECUTE format('TRUNCATE %I', v_name);
    UPDATE outbox_segments SET opened_at = NULL, closed_at = NULL
    WHERE relation = 'outbox_job_transitions' AND segment = p_segment;
    RETURN NULL;
END
$$;

-- Retention's functions run with the owner's rights: nobody but the owner and the roles
-- schema/roles.sql names (outbox_processor) may call them (PUBLIC may call a new function).
REVOKE EXECUTE ON FUNCTION
    outbox_segment_create(text, smallint),
    outbox_segments_rotate(text),
    outbox_events_segment_truncate(smallint, pg_snapshot),
    outbox_job_transitions_segment_truncate(smallint, timestamptz)
    FROM PUBLIC;

-- ============================================================================================
-- Operating it
-- ============================================================================================

-- Events applied per partition in 10-second buckets (one small upsert per batch), for the recent
-- throughput `outbox backlog` shows; buckets older than a day are dropped by `outbox prune` and,
-- every 10 minutes, by the one worker elected for it (processor/election.py).
CREATE TABLE outbox_throughput (
    partition integer NOT NULL,
    bucket    timestamptz NOT NULL,
    events    bigint NOT NULL,
    PRIMARY KEY (partition, bucket)
);


-- ============================================================================================
-- The first segments: 0 closed (what a migrated database had before 0015), 1 current
-- ============================================================================================

SELECT outbox_segment_create(relation, segment)
FROM (VALUES ('outbox_events'), ('outbox_job_transitions')) AS r (relation)
CROSS JOIN (VALUES (0::smallint), (1::smallint)) AS g (segment)
ORDER BY relation, segment;
UPDATE outbox_segments SET opened_at = clock_timestamp(), closed_at = clock_timestamp() WHERE segment = 0;
UPDATE outbox_segments SET opened_at = clock_timestamp() WHERE segment = 1;


-- ============================================================================================
-- The migrations this file equals
-- ============================================================================================

INSERT INTO outbox_schema_migrations (version, name) VALUES
    (1, 'initial'),
    (2, 'operations'),
    (3, 'notify_wakeup'),
    (4, 'drain_path'),
    (5, 'writer_path'),
    (6, 'partitions'),
    (7, 'capture_path'),
    (8, 'capture_fast_path'),
    (9, 'state_under_concurrency'),
    (10, 'job_state_owner'),
    (11, 'guard_after_row'),
    (12, 'job_transitions'),
    (13, 'trace_context'),
    (14, 'rolling_upgrades'),
    (15, 'segments');

UPDATE outbox_schema_migrations SET serves_workers_from = 14 WHERE version IN (14, 15);
