-- Least privilege: three group roles, outbox_writer, outbox_processor and outbox_subscriber, and
-- exactly what each needs.
--
-- How to use it. `outbox migrate` runs as the owner of the tables (DDL, triggers, the adoption
-- backfill, removing a legacy trigger): keep that role for migrations only. Then, as that owner (or
-- a superuser), in the same database:
--
--     psql "$ADMIN_URL" -v ON_ERROR_STOP=1 --single-transaction -f schema/roles.sql
--
-- and give the group roles to your login roles:
--
--     GRANT outbox_writer TO app;                 -- whatever writes jobs / jobs_variants
--     GRANT outbox_processor TO outbox_worker;    -- `outbox run` and the operations commands
--     GRANT outbox_subscriber TO app;             -- outbox.Subscriber, `outbox deliver`
--
-- It is plain SQL (no psql variables), so any client can run it, and it is idempotent: every run
-- first revokes, then grants, so the privileges are exactly these whatever was granted before.
-- Run it again after every `outbox migrate` that applies a migration (new tables and functions get
-- no privileges, and new functions get EXECUTE for PUBLIC, until it runs).
--
-- Names. Roles are cluster-wide: the group roles are created when missing (which needs CREATEROLE
-- once) and shared by every database of the cluster where this script ran; a login that is a member
-- gets these rights in each of them. For separate rights per database, rename the two roles in
-- this file. The product's schema and table names are not configurable (it uses the unqualified
-- names below, resolved through the search_path, as `outbox migrate` created them), so neither
-- are they here.
--
-- Trigger functions keep invoker rights (no SECURITY DEFINER): the capture trigger appends the
-- event with the writer's own rights, which is why the writer needs INSERT on outbox_events and
-- the sequence and functions below. A writer can therefore append an event directly; it gains
-- nothing it could not do by writing jobs_variants, and an event it makes up becomes a dead letter.
-- It cannot choose an event's txid or created_at (no privilege on those columns), nor change or
-- remove any event.
--
-- After this script, a role that writes jobs_variants must be a member of outbox_writer (or own
-- the tables): EXECUTE on the product's functions is no longer granted to PUBLIC.
--
-- The matrix (tests/reliability/test_privileges.py checks it):
--
--   object                      outbox_writer                          outbox_processor
--   jobs                        SELECT, INSERT, DELETE; UPDATE only of  SELECT and UPDATE of status,
--                               columns the product does not own        current_step, updated_at;
--                               (none in the product's own table)       SELECT of job_id and xmin
--   jobs_variants               SELECT, INSERT, UPDATE, DELETE          SELECT of job_variants_id, job_id,
--                                                                       status, current_step, updated_at;
--                                                                       UPDATE of updated_at (*)
--   outbox_events               INSERT of the columns the capture       SELECT, DELETE (prune of v14), INSERT as
--                               function writes (not txid, created_at)  the writer (verify --repair),
--                                                                       UPDATE of txid (rebase after a
--                                                                       restore; never the payload)
--   outbox_variant_versions     USAGE (nextval)                         USAGE (verify --repair)
--   outbox_checkpoints          -                                       SELECT, UPDATE
--   outbox_dirty_jobs           -                                       SELECT, INSERT, UPDATE, DELETE
--   outbox_job_flags, outbox_variant_states, outbox_dead_letters, outbox_throughput
--                               -                                       SELECT, INSERT, UPDATE, DELETE
--   outbox_variant_baseline     -                                       SELECT, INSERT, UPDATE
--   outbox_schema_migrations, outbox_partitioning
--                               -                                       SELECT
--   outbox_fold_config          SELECT (update_variant checks a step)   SELECT, UPDATE (`outbox pipeline set`)
--   outbox_job_holds            - (outbox_hold_job writes it)           SELECT
--   outbox_job_transitions      -                                      SELECT, INSERT (jobs_write), DELETE
--                                                                       (prune)
--   outbox_job_transitions_staged
--                               - (outbox_hold_job stages a hold's)    SELECT, DELETE (publishing)
--   outbox_subscriptions, outbox_subscription_failures
--                               -                                       SELECT, INSERT, UPDATE, DELETE
--                                                                       (`outbox subscriptions ...`)
--   outbox_transitions_lock, outbox_transitions_publish_v1
--                               -                                      EXECUTE
--   outbox_segments             -                                      SELECT
--   outbox_events_segment       EXECUTE (the default of a new event's   EXECUTE
--                               segment column)
--   outbox_job_transitions_segment, outbox_segments_rotate, outbox_events_segment_truncate,
--   outbox_job_transitions_segment_truncate
--                               -                                      EXECUTE (retention: they run
--                                                                       with the owner's rights, the
--                                                                       only ones that create, attach
--                                                                       and truncate segments)
--
--   outbox_subscriber (a subscription's consumer): SELECT on outbox_job_transitions; SELECT and
--   UPDATE (position, acknowledged_at) on outbox_subscriptions; SELECT, INSERT, UPDATE, DELETE on
--   outbox_subscription_failures; SELECT on outbox_schema_migrations and outbox_fold_config (the
--   commands check the schema first). Nothing else: it reads transitions and moves its position.
--   outbox_partition_of, outbox_partition_hash, outbox_append_variant_event
--                               EXECUTE                                 EXECUTE
--   outbox_refuse_variant       EXECUTE (capture calls it to refuse     -
--                               a bad status or step)
--   outbox_capture_change      EXECUTE (capture calls it for changes   -
--                               made inside other triggers, 0009)
--   outbox_job_status, outbox_job_step, outbox_variant_status, outbox_variant_step (the casts of the
--   application's column types, 0010)
--                               EXECUTE                                 EXECUTE
--   outbox_hold_job, outbox_release_job
--                               EXECUTE (they run with the owner's      -
--                               rights: holds, 0010)
--   outbox_guard_job_state      nobody (a trigger function)
--   outbox_event_applied_v1, outbox_variant_states_merge_v1, outbox_event_payload, outbox_payload_fits,
--   outbox_state_newer, outbox_variant_states_newest, outbox_variant_baseline_merge,
--   outbox_event_decode_v1, outbox_versions_issued_v1, outbox_unreadable_problem_v1, outbox_events_pending
--                               -                                       EXECUTE
--   outbox_capture_variant_change, outbox_capture_variant_update, outbox_wakeup_notify
--                               nobody (a trigger function's EXECUTE is checked when the
--                               trigger is created, by `outbox migrate`, not when it fires)
--   outbox_partitions_set, outbox_wakeup_enable, outbox_wakeup_disable
--                               nobody: DDL, for the owner (`outbox repartition`, `outbox migrate
--                               --wakeup`)
--
--   (*) `outbox verify --repair` reads a variant row FOR UPDATE (its lock orders the resync event
--   after every change of the variant), and PostgreSQL requires UPDATE on at least one column for
--   that. updated_at is the harmless one: changing it alone writes no event.
--
-- Neither role gets TRUNCATE (not captured), REFERENCES or TRIGGER, nor UPDATE of an event (an
-- operator fixes a bad payload as the owner, then runs `outbox dead-letters retry`). Advisory locks
-- and the catalog and statistics views the worker reads need no grant. pg_stat_activity shows the
-- start time and state of another login's session only to pg_read_all_stats: run the worker and
-- `outbox backlog` as the same login, or `backlog` shows the consumer without its idle time.

-- The group roles, when missing. A concurrent run in another database may create them first.
DO $$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['outbox_writer', 'outbox_processor', 'outbox_subscriber'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role_name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$$;

-- Start from nothing, so the result is exact on a re-run or after hand-made grants.
REVOKE ALL ON TABLE jobs, jobs_variants FROM outbox_writer, outbox_processor, outbox_subscriber;
REVOKE ALL ON TABLE
    outbox_events, outbox_checkpoints, outbox_dirty_jobs, outbox_job_flags, outbox_variant_states,
    outbox_dead_letters, outbox_throughput, outbox_variant_baseline, outbox_schema_migrations,
    outbox_partitioning, outbox_fold_config, outbox_job_holds, outbox_job_transitions, outbox_subscriptions,
    outbox_subscription_failures, outbox_job_transitions_staged, outbox_segments
    FROM PUBLIC, outbox_writer, outbox_processor, outbox_subscriber;
REVOKE ALL ON SEQUENCE outbox_variant_versions FROM PUBLIC, outbox_writer, outbox_processor;
REVOKE ALL ON FUNCTION
    outbox_partition_of(uuid),
    outbox_append_variant_event(text, uuid, uuid, text, text),
    outbox_capture_variant_change(),
    outbox_capture_variant_update(),
    outbox_refuse_variant(text, text),
    outbox_event_payload(jsonb),
    outbox_payload_fits(jsonb),
    outbox_event_applied_v1(xid8, bigint, pg_snapshot, pg_snapshot, xid8, bigint),
    outbox_variant_states_merge_v1(outbox_variant_states[]),
    outbox_partition_hash(uuid, integer),
    outbox_partitions_set(integer),
    outbox_wakeup_notify(),
    outbox_wakeup_enable(),
    outbox_wakeup_disable(),
    outbox_capture_change(uuid, uuid, uuid, uuid, text, text),
    outbox_state_newer(bigint, bigint, bigint, bigint),
    outbox_variant_states_newest(outbox_variant_states[]),
    outbox_variant_baseline_merge(outbox_variant_states[]),
    outbox_event_decode_v1(text, integer, uuid, uuid, bigint, jsonb, bigint),
    outbox_versions_issued_v1(),
    outbox_unreadable_problem_v1(bigint, text),
    outbox_events_pending(integer),
    outbox_guard_job_state(),
    outbox_hold_job(uuid, text, text, text),
    outbox_release_job(uuid),
    outbox_job_status(text),
    outbox_job_step(text),
    outbox_variant_status(text),
    outbox_variant_step(text),
    outbox_transitions_lock(),
    outbox_transitions_publish_v1(),
    outbox_events_segment(),
    outbox_job_transitions_segment(),
    outbox_segment_create(text, smallint),
    outbox_segments_rotate(text),
    outbox_events_segment_truncate(smallint, pg_snapshot),
    outbox_job_transitions_segment_truncate(smallint, timestamptz)
    FROM PUBLIC, outbox_writer, outbox_processor, outbox_subscriber;

-- Connecting to this database and resolving the names in its schema (PUBLIC usually has both;
-- granted in case an administrator revoked them).
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO outbox_writer, outbox_processor, outbox_subscriber',
                   current_database());
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO outbox_writer, outbox_processor, outbox_subscriber',
                   (SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = 'outbox_events'::regclass));
END
$$;

-- The writer: the application's tables as applications use them, and appending events.
-- create_job inserts a job row (queued); after that, a job's status, current_step and updated_at
-- are the processor's alone.
GRANT SELECT, INSERT, DELETE ON jobs TO outbox_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON jobs_variants TO outbox_writer;
GRANT INSERT (partition, event_type, schema_version, job_id, variant_id, variant_version, payload, trace_parent)
    ON outbox_events TO outbox_writer;
GRANT USAGE ON SEQUENCE outbox_variant_versions TO outbox_writer;
GRANT EXECUTE ON FUNCTION
    outbox_partition_of(uuid),
    outbox_partition_hash(uuid, integer),
    outbox_append_variant_event(text, uuid, uuid, text, text),
    outbox_refuse_variant(text, text),
    outbox_capture_change(uuid, uuid, uuid, uuid, text, text),
    outbox_job_status(text),
    outbox_job_step(text),
    outbox_variant_status(text),
    outbox_variant_step(text),
    outbox_hold_job(uuid, text, text, text),
    outbox_release_job(uuid),
    outbox_events_segment()
    TO outbox_writer;
GRANT SELECT ON outbox_fold_config TO outbox_writer;

-- An adopted jobs table may have columns of the application's own: writers keep updating those.
DO $$
DECLARE
    column_name name;
BEGIN
    FOR column_name IN
        SELECT attname FROM pg_attribute
        WHERE attrelid = 'jobs'::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
          AND attname NOT IN ('job_id', 'status', 'current_step', 'updated_at')
        ORDER BY attnum
    LOOP
        EXECUTE format('GRANT UPDATE (%I) ON jobs TO outbox_writer', column_name);
    END LOOP;
END
$$;

-- The processor: `outbox run`, backlog, replay, verify [--repair], dead-letters, prune.
-- xmin: jobs_write tells a row changed since its snapshot (a hold committed meanwhile) by it.
GRANT SELECT (job_id, status, current_step, updated_at, xmin), UPDATE (status, current_step, updated_at)
    ON jobs TO outbox_processor;
GRANT SELECT (job_variants_id, job_id, status, current_step, updated_at), UPDATE (updated_at)
    ON jobs_variants TO outbox_processor;
GRANT SELECT, DELETE, UPDATE (txid) ON outbox_events TO outbox_processor;
GRANT INSERT (partition, event_type, schema_version, job_id, variant_id, variant_version, payload, trace_parent)
    ON outbox_events TO outbox_processor;
GRANT USAGE ON SEQUENCE outbox_variant_versions TO outbox_processor;
GRANT SELECT, UPDATE ON outbox_checkpoints TO outbox_processor;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_dirty_jobs TO outbox_processor;
GRANT SELECT, UPDATE ON outbox_fold_config TO outbox_processor;
GRANT SELECT ON outbox_job_holds TO outbox_processor;
GRANT SELECT, INSERT, UPDATE, DELETE
    ON outbox_job_flags, outbox_variant_states, outbox_dead_letters, outbox_throughput TO outbox_processor;
GRANT SELECT, INSERT, UPDATE ON outbox_variant_baseline TO outbox_processor;
GRANT SELECT, INSERT, DELETE ON outbox_job_transitions TO outbox_processor;
GRANT SELECT, DELETE ON outbox_job_transitions_staged TO outbox_processor;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_subscriptions, outbox_subscription_failures TO outbox_processor;
GRANT SELECT ON outbox_schema_migrations, outbox_partitioning TO outbox_processor;
GRANT EXECUTE ON FUNCTION
    outbox_partition_of(uuid),
    outbox_partition_hash(uuid, integer),
    outbox_append_variant_event(text, uuid, uuid, text, text),
    outbox_event_applied_v1(xid8, bigint, pg_snapshot, pg_snapshot, xid8, bigint),
    outbox_variant_states_merge_v1(outbox_variant_states[]),
    outbox_event_payload(jsonb),
    outbox_payload_fits(jsonb),
    outbox_state_newer(bigint, bigint, bigint, bigint),
    outbox_variant_states_newest(outbox_variant_states[]),
    outbox_variant_baseline_merge(outbox_variant_states[]),
    outbox_event_decode_v1(text, integer, uuid, uuid, bigint, jsonb, bigint),
    outbox_versions_issued_v1(),
    outbox_unreadable_problem_v1(bigint, text),
    outbox_events_pending(integer),
    outbox_job_status(text),
    outbox_job_step(text),
    outbox_transitions_lock(),
    outbox_transitions_publish_v1(),
    outbox_events_segment(),
    outbox_job_transitions_segment(),
    outbox_segments_rotate(text),
    outbox_events_segment_truncate(smallint, pg_snapshot),
    outbox_job_transitions_segment_truncate(smallint, timestamptz)
    TO outbox_processor;
GRANT SELECT ON outbox_segments TO outbox_processor;

-- The subscriber: reads transitions, moves its subscription's position, records its failures.
GRANT SELECT ON outbox_job_transitions TO outbox_subscriber;
-- `outbox deliver` and `outbox subscribe` check the schema's version first.
GRANT SELECT ON outbox_schema_migrations, outbox_fold_config TO outbox_subscriber;
GRANT SELECT, UPDATE (position, acknowledged_at) ON outbox_subscriptions TO outbox_subscriber;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_subscription_failures TO outbox_subscriber;
