-- 0015: retention by segments: outbox_events and outbox_job_transitions become partitioned tables
-- whose partitions (segments) writers fill one at a time; retention truncates a whole segment once
-- every row in it is applied (events) or acknowledged (transitions), instead of deleting rows.
--
-- Serves workers from: 14
--
-- Why: docs/decisions/0015-retention-by-segments.md. The existing table becomes segment 0, closed;
-- 0015_segments.prepare.sql, run before this transaction while writers write, gave it the segment
-- column, a valid CHECK (segment = 0) and the new primary key's index, so that nothing here reads
-- or indexes its rows under the writers' lock. Workers of version 14 keep working: their prune
-- deletes through the partitioned table, and every statement they run reads it as before.

-- The segments of each segmented table. Free: empty, ready to be the next current one (opened_at
-- NULL). Current: the one writers append to (closed_at NULL). Closed: writers moved on; retention
-- truncates it once its every row may go, and it is free again.
CREATE TABLE IF NOT EXISTS outbox_segments (
    relation  text NOT NULL CHECK (relation IN ('outbox_events', 'outbox_job_transitions')),
    segment   smallint NOT NULL CHECK (segment >= 0),
    opened_at timestamptz,
    closed_at timestamptz CHECK (closed_at IS NULL OR opened_at IS NOT NULL),
    PRIMARY KEY (relation, segment)
);

CREATE UNIQUE INDEX IF NOT EXISTS outbox_segments_current ON outbox_segments (relation) WHERE opened_at IS NOT NULL AND closed_at IS NULL;

-- The segment a new row goes to: its body holds the number (outbox_segments_rotate rewrites it),
-- so that it is inlined into the writers' INSERT as a constant and replacing it invalidates their
-- cached plans, as outbox_partition_of does. A writer that still runs the old plan appends to the
-- segment just closed: retention sees that row and keeps the segment (outbox_events_segment_truncate).
-- Created only where missing: run again, this migration must not move writers back to segment 1.
DO $$
BEGIN
    IF to_regprocedure('outbox_events_segment()') IS NULL THEN
        CREATE FUNCTION outbox_events_segment() RETURNS smallint
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS 'SELECT 1::smallint';
    END IF;
    IF to_regprocedure('outbox_job_transitions_segment()') IS NULL THEN
        CREATE FUNCTION outbox_job_transitions_segment() RETURNS smallint
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS 'SELECT 1::smallint';
    END IF;
END
$$;

-- A new segment: a table like its parent, attached (SHARE UPDATE EXCLUSIVE on the parent: writers
-- and readers go on; CREATE TABLE ... PARTITION OF would take ACCESS EXCLUSIVE).
CREATE OR REPLACE FUNCTION outbox_segment_create(p_relation text, p_segment smallint) RETURNS void
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
CREATE OR REPLACE FUNCTION outbox_segments_rotate(p_relation text) RETURNS smallint
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
CREATE OR REPLACE FUNCTION outbox_events_segment_truncate(p_segment smallint, p_folded pg_snapshot) RETURNS text
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
CREATE OR REPLACE FUNCTION outbox_job_transitions_segment_truncate(p_segment smallint, p_cutoff timestamptz) RETURNS text
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

-- The baseline merge writes only the variants whose state the events move forward: the others are
-- not even locked (a no-op ON CONFLICT DO UPDATE still locks, and logs, the row).
CREATE OR REPLACE FUNCTION outbox_variant_baseline_merge(p_states outbox_variant_states[])
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

-- The privileges granted on a table, moved to another (table and column privileges): the writers
-- and workers keep their rights on the new parents without waiting for schema/roles.sql, and the
-- old table (now segment 0) keeps none: rows are read and written through the parent.
CREATE OR REPLACE FUNCTION outbox_grants_copy(p_from regclass, p_to regclass) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT a.privilege_type, a.grantee, NULL::name AS column_name
        FROM pg_class AS c CROSS JOIN LATERAL aclexplode(c.relacl) AS a
        WHERE c.oid = p_from AND a.grantee <> c.relowner
        UNION ALL
        SELECT a.privilege_type, a.grantee, t.attname
        FROM pg_attribute AS t CROSS JOIN LATERAL aclexplode(t.attacl) AS a
        WHERE t.attrelid = p_from AND t.attnum > 0 AND NOT t.attisdropped
    LOOP
        EXECUTE format('GRANT %s %s ON %s TO %s', r.privilege_type,
                       CASE WHEN r.column_name IS NOT NULL THEN format('(%I)', r.column_name) ELSE '' END,
                       p_to, CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r.grantee)) END);
        EXECUTE format('REVOKE %s %s ON %s FROM %s', r.privilege_type,
                       CASE WHEN r.column_name IS NOT NULL THEN format('(%I)', r.column_name) ELSE '' END,
                       p_from, CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r.grantee)) END);
    END LOOP;
END
$$;

-- The populated events table becomes segment 0 of a partitioned one. Under the writers' lock, only
-- catalog changes: renames, the primary key swapped to the index the prepare step built, the
-- identity handed to the parent (its sequence goes on from the same value), and an ATTACH whose
-- check the valid CHECK (segment = 0) proves without a scan.
DO $$
DECLARE
    v_last bigint;
    v_called boolean;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'outbox_events'::regclass) = 'p' THEN
        RETURN;  -- run again: already segmented
    END IF;
    LOCK TABLE outbox_events IN ACCESS EXCLUSIVE MODE;
    -- For a database where the prepare steps did not run (a fresh install: the table is empty).
    ALTER TABLE outbox_events ADD COLUMN IF NOT EXISTS segment smallint NOT NULL DEFAULT 0;
    IF NOT EXISTS (SELECT FROM pg_constraint WHERE conrelid = 'outbox_events'::regclass
                   AND conname = 'outbox_events_s0_segment') THEN
        ALTER TABLE outbox_events ADD CONSTRAINT outbox_events_s0_segment CHECK (segment = 0);
    END IF;
    IF EXISTS (SELECT FROM pg_index WHERE indexrelid = to_regclass('outbox_events_s0_pkey_new') AND NOT indisvalid) THEN
        DROP INDEX outbox_events_s0_pkey_new;  -- a prepare step's build that did not finish
    END IF;
    IF to_regclass('outbox_events_s0_pkey_new') IS NULL THEN
        CREATE UNIQUE INDEX outbox_events_s0_pkey_new ON outbox_events (event_id, segment);
    END IF;
    SELECT last_value, is_called INTO v_last, v_called FROM outbox_events_event_id_seq;
    ALTER TABLE outbox_events ALTER COLUMN event_id DROP IDENTITY;
    ALTER TABLE outbox_events DROP CONSTRAINT outbox_events_pkey;
    ALTER TABLE outbox_events ADD CONSTRAINT outbox_events_s0_pkey PRIMARY KEY USING INDEX outbox_events_s0_pkey_new;
    ALTER TABLE outbox_events RENAME TO outbox_events_s0;
    ALTER INDEX outbox_events_position_idx RENAME TO outbox_events_s0_partition_txid_event_id_idx;
    ALTER INDEX outbox_events_variant_id_idx RENAME TO outbox_events_s0_variant_id_idx;
    ALTER TABLE outbox_events_s0 ALTER COLUMN segment SET DEFAULT outbox_events_segment();

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
    CREATE INDEX outbox_events_position_idx ON outbox_events (partition, txid, event_id);
    CREATE INDEX outbox_events_variant_id_idx ON outbox_events (variant_id);
    PERFORM setval(pg_get_serial_sequence('outbox_events', 'event_id'), v_last, v_called);

    PERFORM outbox_grants_copy('outbox_events_s0', 'outbox_events');
    ALTER TABLE outbox_events ATTACH PARTITION outbox_events_s0 FOR VALUES IN (0);
    ALTER TABLE outbox_events_s0 DROP CONSTRAINT outbox_events_s0_segment;
    INSERT INTO outbox_segments (relation, segment, opened_at, closed_at)
    VALUES ('outbox_events', 0, clock_timestamp(), clock_timestamp());
    PERFORM outbox_segment_create('outbox_events', 1::smallint);
    UPDATE outbox_segments SET opened_at = clock_timestamp() WHERE relation = 'outbox_events' AND segment = 1;
END
$$;

-- The same for the transitions (written by the workers only, which this transaction holds back).
DO $$
DECLARE
    v_last bigint;
    v_called boolean;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'outbox_job_transitions'::regclass) = 'p' THEN
        RETURN;
    END IF;
    LOCK TABLE outbox_job_transitions IN ACCESS EXCLUSIVE MODE;
    ALTER TABLE outbox_job_transitions ADD COLUMN IF NOT EXISTS segment smallint NOT NULL DEFAULT 0;
    IF NOT EXISTS (SELECT FROM pg_constraint WHERE conrelid = 'outbox_job_transitions'::regclass
                   AND conname = 'outbox_job_transitions_s0_segment') THEN
        ALTER TABLE outbox_job_transitions ADD CONSTRAINT outbox_job_transitions_s0_segment CHECK (segment = 0);
    END IF;
    IF EXISTS (SELECT FROM pg_index WHERE indexrelid = to_regclass('outbox_job_transitions_s0_pkey_new') AND NOT indisvalid) THEN
        DROP INDEX outbox_job_transitions_s0_pkey_new;  -- a prepare step's build that did not finish
    END IF;
    IF to_regclass('outbox_job_transitions_s0_pkey_new') IS NULL THEN
        CREATE UNIQUE INDEX outbox_job_transitions_s0_pkey_new ON outbox_job_transitions (transition_id, segment);
    END IF;
    SELECT last_value, is_called INTO v_last, v_called FROM outbox_job_transitions_transition_id_seq;
    ALTER TABLE outbox_job_transitions ALTER COLUMN transition_id DROP IDENTITY;
    ALTER TABLE outbox_job_transitions DROP CONSTRAINT outbox_job_transitions_pkey;
    ALTER TABLE outbox_job_transitions
        ADD CONSTRAINT outbox_job_transitions_s0_pkey PRIMARY KEY USING INDEX outbox_job_transitions_s0_pkey_new;
    ALTER TABLE outbox_job_transitions RENAME TO outbox_job_transitions_s0;
    ALTER INDEX outbox_job_transitions_job RENAME TO outbox_job_transitions_s0_job_id_transition_id_idx;
    ALTER TABLE outbox_job_transitions_s0 ALTER COLUMN segment SET DEFAULT outbox_job_transitions_segment();

    CREATE TABLE outbox_job_transitions (
        transition_id   bigint GENERATED ALWAYS AS IDENTITY,
        job_id          uuid NOT NULL,
        partition       integer NOT NULL,
        from_status     text,
        from_step       text,
        to_status       text NOT NULL,
        to_step         text,
        written_by      text NOT NULL CONSTRAINT outbox_job_transitions_written_by_check
                             CHECK (written_by IN ('processor', 'hold')),
        transitioned_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        trace_parent    text,
        segment         smallint NOT NULL DEFAULT outbox_job_transitions_segment(),
        PRIMARY KEY (transition_id, segment)
    ) PARTITION BY LIST (segment);
    CREATE INDEX outbox_job_transitions_job ON outbox_job_transitions (job_id, transition_id);
    PERFORM setval(pg_get_serial_sequence('outbox_job_transitions', 'transition_id'), v_last, v_called);

    PERFORM outbox_grants_copy('outbox_job_transitions_s0', 'outbox_job_transitions');
    ALTER TABLE outbox_job_transitions ATTACH PARTITION outbox_job_transitions_s0 FOR VALUES IN (0);
    ALTER TABLE outbox_job_transitions_s0 DROP CONSTRAINT outbox_job_transitions_s0_segment;
    INSERT INTO outbox_segments (relation, segment, opened_at, closed_at)
    VALUES ('outbox_job_transitions', 0, clock_timestamp(), clock_timestamp());
    PERFORM outbox_segment_create('outbox_job_transitions', 1::smallint);
    UPDATE outbox_segments SET opened_at = clock_timestamp() WHERE relation = 'outbox_job_transitions' AND segment = 1;
END
$$;

DROP FUNCTION outbox_grants_copy(regclass, regclass);

-- Retention's functions run with the owner's rights: nobody but the owner and the roles
-- schema/roles.sql names (outbox_processor) may call them (PUBLIC may call a new function).
REVOKE EXECUTE ON FUNCTION
    outbox_segment_create(text, smallint),
    outbox_segments_rotate(text),
    outbox_events_segment_truncate(smallint, pg_snapshot),
    outbox_job_transitions_segment_truncate(smallint, timestamptz)
    FROM PUBLIC;

-- outbox_events_pending returned rows of the table that is now segment 0: the same function, over
-- the partitioned table, with the same grants.
DO $do$
DECLARE
    v_grants text[] := ARRAY(
        SELECT format('GRANT EXECUTE ON FUNCTION outbox_events_pending(integer) TO %s',
                      CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END)
        FROM pg_proc AS p CROSS JOIN LATERAL aclexplode(p.proacl) AS a
        WHERE p.oid = 'outbox_events_pending(integer)'::regprocedure AND a.grantee <> p.proowner);
    v_revoke boolean := (SELECT proacl IS NOT NULL FROM pg_proc WHERE oid = 'outbox_events_pending(integer)'::regprocedure);
    v_grant text;
BEGIN
    IF (SELECT prorettype FROM pg_proc WHERE oid = 'outbox_events_pending(integer)'::regprocedure)
       = 'outbox_events'::regtype THEN
        RETURN;  -- run again: already over the partitioned table
    END IF;
    DROP FUNCTION outbox_events_pending(integer);
    EXECUTE $f$
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
    $f$;
    IF v_revoke THEN  -- its ACL was set (schema/roles.sql revokes PUBLIC's EXECUTE): the same again
        REVOKE EXECUTE ON FUNCTION outbox_events_pending(integer) FROM PUBLIC;
    END IF;
    FOREACH v_grant IN ARRAY v_grants LOOP
        EXECUTE v_grant;
    END LOOP;
END
$do$;

-- The writers append through the parents: their functions name them by name, and their cached plans
-- are planned again (the relation the name resolves to is a new one).
