-- All of the processor's SQL at run time, named noun_verb. processor/store.py is the only module
-- that runs these.

-- name: checkpoint_get
SELECT done_snapshot::text, target_snapshot::text, last_txid::text, last_event_id, events_applied, updated_at,
       fold_config_version
FROM outbox_checkpoints
WHERE partition = %(partition)s

-- name: checkpoint_lock
-- FOR UPDATE serialises every transaction that moves this partition's checkpoint: a second
-- consumer (a zombie, or one that got past the advisory lock through a pooler) waits here, then
-- sees the moved checkpoint and applies nothing (processor.batch.FencedError). The row as locked
-- (after any wait) also says which fold configuration the partition folds with now.
SELECT done_snapshot::text, target_snapshot::text, last_txid::text, last_event_id, fold_config_version
FROM outbox_checkpoints
WHERE partition = %(partition)s
FOR UPDATE

-- name: checkpoints_lock_all
-- Every partition's checkpoint, locked in partition order: what an operation holds while it
-- changes variant or job state of any partition (replay, repair, dead letters, a pipeline change).
-- Workers wait for it between two batches, `outbox repartition` waits for it before it switches
-- (it locks them in the same order), and it waits for them: none of them runs while it does.
SELECT partition, done_snapshot::text, target_snapshot::text, last_txid::text, last_event_id, fold_config_version
FROM outbox_checkpoints
ORDER BY partition
FOR UPDATE

-- name: events_probe
-- Whether any event is ready after the cursor (the worker's cheap check before it opens a batch
-- transaction). Same conditions as events_apply's read, with this statement's snapshot as target.
WITH target AS MATERIALIZED (
    SELECT pg_current_snapshot() AS snapshot
)
SELECT EXISTS (
           SELECT 1
           FROM outbox_events
           WHERE partition = %(partition)s
             AND (txid, event_id) > (%(range_txid)s::xid8, %(range_event_id)s::bigint)
             AND txid < (SELECT pg_snapshot_xmax(snapshot) FROM target)
             AND pg_visible_in_snapshot(txid, (SELECT snapshot FROM target))
       )
    OR EXISTS (
           SELECT 1
           FROM unnest(%(done_xip)s::xid8[]) AS xip (txid)
           JOIN outbox_events AS o ON o.partition = %(partition)s AND o.txid = xip.txid
           WHERE pg_visible_in_snapshot(xip.txid, (SELECT snapshot FROM target))
       )

-- name: events_apply
-- Reads the next events after the cursor and applies the readable ones to the variant states, in
-- one statement (one round trip, and no per-event work in Python): the heart of the drain.
--
-- Which events: those of the transactions that committed after the done snapshot and are visible
-- in the target snapshot (this statement's own snapshot when none is given), in (txid, event_id)
-- order. Not visible in the done snapshot means: txid at or above its xmax, or in its xip list; the
-- two branches read each of those from the index. A transaction still running is in neither
-- result, and stays in the next target's xip list until it ends: a late commit is picked up, not
-- skipped.
--
-- Readable events (outbox_event_decode) are merged into the variant states (the newest of each
-- variant wins: outbox_variant_states_merge). Anything else is left to processor.decode, by event
-- id, to become a problem state and a dead letter.
--
-- Returns the target snapshot, the events read (ids and write times, in order), the position of
-- the last one, the unreadable ones, and the jobs to refold: those of the variants whose state
-- moved forward, and the jobs such variants moved away from. Last, the trace context (migration
-- 0013) of each job's last event in the batch that carries one: the batch span links to them, and
-- the job's transition carries it (NULL arrays when no event of the batch has one).
WITH target AS MATERIALIZED (
    SELECT coalesce(%(target)s::pg_snapshot, pg_current_snapshot()) AS snapshot
), issued AS MATERIALIZED (
    SELECT outbox_versions_issued() AS versions
), batch AS MATERIALIZED (
    SELECT e.*
    FROM (
        (SELECT *
         FROM outbox_events
         WHERE partition = %(partition)s
           -- Starts the index range at the done snapshot's xmax (or further on, within a catch-up),
           -- not at the first event ever written.
           AND (txid, event_id) > (%(range_txid)s::xid8, %(range_event_id)s::bigint)
           AND txid < (SELECT pg_snapshot_xmax(snapshot) FROM target)
           AND pg_visible_in_snapshot(txid, (SELECT snapshot FROM target))
         ORDER BY txid, event_id
         LIMIT %(limit)s)
        UNION ALL
        -- One index read per transaction that was running at the done snapshot and is visible now,
        -- each in event order (txid = ANY(...) on the index would read them all and sort).
        (SELECT x.*
         FROM unnest(%(done_xip)s::xid8[]) AS xip (txid)
         CROSS JOIN LATERAL (
             SELECT *
             FROM outbox_events AS o
             WHERE o.partition = %(partition)s
               AND o.txid = xip.txid
               AND (o.txid, o.event_id) > (%(after_txid)s::xid8, %(after_event_id)s::bigint)
             ORDER BY o.event_id
             LIMIT %(limit)s
         ) AS x
         WHERE pg_visible_in_snapshot(xip.txid, (SELECT snapshot FROM target))
         ORDER BY x.txid, x.event_id
         LIMIT %(limit)s)
    ) AS e
    ORDER BY e.txid, e.event_id
    LIMIT %(limit)s
), decoded AS MATERIALIZED (
    SELECT b.event_id, b.txid, b.created_at, b.job_id, b.variant_id, b.variant_version AS version,
           b.trace_parent, d.*
    FROM batch AS b
    -- A column, not a sub-select, as the last argument: the planner inlines the function then.
    CROSS JOIN issued AS i
    CROSS JOIN LATERAL outbox_event_decode(
        b.event_type, b.schema_version, b.job_id, b.variant_id, b.variant_version, b.payload, i.versions) AS d
), upserted AS MATERIALIZED (  -- evaluated exactly once: it writes
    SELECT merged_job_id AS job_id, merged_moved_from AS moved_from
    FROM outbox_variant_states_merge(ARRAY(
        SELECT (variant_id, job_id, version, status, step, removed, NULL, event_id, NULL)::outbox_variant_states
        FROM decoded
        WHERE readable
    ))
), moved AS (
    -- Jobs that variants left, in this partition; a job of another partition learns of the move
    -- from the variant_removed event in its own partition.
    SELECT moved_from
    FROM upserted
    WHERE moved_from IS NOT NULL AND outbox_partition_of(moved_from) = %(partition)s
), summary AS (
    -- One pass over the batch. The last event in (txid, event_id) order has the highest txid.
    SELECT count(*) AS events,
           array_agg(event_id ORDER BY txid, event_id) AS event_ids,
           array_agg(date_part('epoch', created_at) ORDER BY txid, event_id) AS created_at,
           max(txid)::text AS last_txid,
           count(*) FILTER (WHERE readable) AS readable,
           array_agg(event_id ORDER BY event_id) FILTER (WHERE NOT readable) AS unreadable
    FROM decoded
), traced AS MATERIALIZED (
    SELECT DISTINCT ON (job_id) job_id, trace_parent
    FROM decoded
    WHERE trace_parent IS NOT NULL AND job_id IS NOT NULL
    ORDER BY job_id, txid DESC, event_id DESC
)
SELECT (SELECT snapshot::text FROM target),
       s.events, s.event_ids, s.created_at, s.last_txid, s.readable, s.unreadable,
       (SELECT array_agg(DISTINCT job_id)
        FROM (SELECT job_id FROM upserted
              UNION ALL
              SELECT moved_from FROM moved
              UNION ALL
              -- A removal can arrive after the variant's state moved on (its move to a job of
              -- another partition was applied first): its job is refolded all the same.
              SELECT job_id FROM decoded WHERE readable AND removed) AS t),
       (SELECT array_agg(DISTINCT moved_from) FROM moved),
       (SELECT array_agg(job_id) FROM traced),
       (SELECT array_agg(trace_parent) FROM traced)
FROM summary AS s

-- name: events_get
-- Events by id, in order, for processor.decode (the ones events_apply left to it), with whether
-- each one's version is one capture issued.
SELECT event_id, txid::text, event_type, schema_version, job_id, variant_id, variant_version,
       outbox_event_payload(payload), created_at,
       variant_version BETWEEN 1 AND (SELECT outbox_versions_issued()) AS version_issued
FROM outbox_events
WHERE event_id = ANY(%(event_ids)s::bigint[])
ORDER BY txid, event_id

-- name: dirty_jobs_add_applied
-- The jobs of every event applied between two done snapshots, when a catch-up that deferred its
-- folding completes: events not visible in the old snapshot and visible in the new one (the same
-- two index branches as events_apply, without a limit). Each waits since its oldest such event.
INSERT INTO outbox_dirty_jobs AS d (partition, job_id, queued_at)
SELECT %(partition)s, e.job_id, min(e.created_at)
FROM (
    SELECT job_id, created_at
    FROM outbox_events
    WHERE partition = %(partition)s
      AND txid >= %(done_xmax)s::xid8
      AND txid < pg_snapshot_xmax(%(new_done)s::pg_snapshot)
      AND pg_visible_in_snapshot(txid, %(new_done)s::pg_snapshot)
    UNION ALL
    SELECT o.job_id, o.created_at
    FROM unnest(%(done_xip)s::xid8[]) AS xip (txid)
    JOIN outbox_events AS o ON o.partition = %(partition)s AND o.txid = xip.txid
    WHERE pg_visible_in_snapshot(xip.txid, %(new_done)s::pg_snapshot)
) AS e
WHERE e.job_id IS NOT NULL
GROUP BY e.job_id
ON CONFLICT (partition, job_id) DO UPDATE SET queued_at = least(d.queued_at, excluded.queued_at), retry_at = NULL

-- name: events_pending_summary
-- Pending work (outbox_events_pending: events whose effect is not in job state yet; and the jobs
-- waiting in outbox_dirty_jobs) of one partition, or of all (NULL). Exact; reads every event above
-- each done snapshot's xmin.
WITH pending AS MATERIALIZED (
    SELECT event_type, job_id, created_at FROM outbox_events_pending(%(partition)s)
), waiting AS MATERIALIZED (
    SELECT job_id, queued_at FROM outbox_dirty_jobs WHERE %(partition)s::integer IS NULL OR partition = %(partition)s
)
SELECT (SELECT count(*) FROM pending),
       (SELECT extract(epoch FROM clock_timestamp() - least(
            (SELECT min(created_at) FROM pending), (SELECT min(queued_at) FROM waiting)))::float8),
       (SELECT coalesce(jsonb_object_agg(event_type, n), '{}'::jsonb)
        FROM (SELECT event_type, count(*) AS n FROM pending GROUP BY event_type) AS t),
       (SELECT coalesce(jsonb_agg(jsonb_build_object('job_id', job_id, 'pending_events', n) ORDER BY n DESC),
                        '[]'::jsonb)
        FROM (SELECT job_id, count(*) AS n FROM pending GROUP BY job_id ORDER BY n DESC LIMIT %(top)s) AS t),
       (SELECT count(*) FROM waiting)

-- name: variant_states_upsert
-- Merges states decoded in Python (problem states) into outbox_variant_states. Returns the jobs
-- to refold: the variants' jobs now, and before (a variant moved to another job: moved_from).
-- With defer, the jobs are kept in outbox_dirty_jobs instead, for when the catch-up is complete.
WITH upserted AS MATERIALIZED (  -- evaluated exactly once: it writes
    SELECT merged_job_id AS job_id, merged_moved_from AS moved_from
    FROM outbox_variant_states_merge(ARRAY(
        SELECT (variant_id, job_id, version, status, step, removed, problem, event_id, NULL)::outbox_variant_states
        FROM unnest(
            %(variant_ids)b::uuid[], %(job_ids)b::uuid[], %(versions)b::bigint[], %(statuses)b::text[],
            %(steps)b::text[], %(removed)b::boolean[], %(problems)b::text[], %(event_ids)b::bigint[]
        ) AS t (variant_id, job_id, version, status, step, removed, problem, event_id)
    ))
), affected AS (
    SELECT job_id FROM upserted
    UNION
    -- Jobs that variants left, in this partition (see events_apply).
    SELECT moved_from
    FROM upserted
    WHERE moved_from IS NOT NULL AND outbox_partition_of(moved_from) = %(partition)s
), deferred AS (
    INSERT INTO outbox_dirty_jobs (partition, job_id)
    SELECT %(partition)s, job_id FROM affected WHERE %(defer)s
    ON CONFLICT DO NOTHING
)
SELECT job_id FROM affected WHERE NOT %(defer)s

-- name: variant_states_to_fold
-- What the fold needs of each job: one row per distinct state among its variants (with one of
-- them as example), removed variants left out. The fold depends only on which states occur, not
-- on how many variants share one (tests/unit/test_fold.py checks it), and a job's variants mostly
-- share a few states: far fewer rows than variants. A dead letter that holds its job (0009) is
-- a problem the fold reports; the check costs nothing while there is none.
SELECT job_id, (array_agg(variant_id))[1], max(version), status, step, problem
FROM outbox_variant_states
WHERE job_id = ANY(%(job_ids)s::uuid[])
  AND NOT removed
GROUP BY job_id, status, step, problem
UNION ALL
SELECT job_id, coalesce(variant_id, '00000000-0000-0000-0000-000000000000'::uuid), 0, NULL, NULL,
       outbox_unreadable_problem(event_id, reason)
FROM outbox_dead_letters
WHERE job_id = ANY(%(job_ids)s::uuid[])
  AND holds_job
  AND discarded_at IS NULL
  AND EXISTS (SELECT FROM outbox_dead_letters WHERE holds_job AND discarded_at IS NULL)

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
-- Jobs ready to be folded (a job whose row was locked waits until retry_at), and when the next
-- one that waits is due.
WITH taken AS (
    DELETE FROM outbox_dirty_jobs
    WHERE partition = %(partition)s
      AND job_id IN (
          SELECT job_id FROM outbox_dirty_jobs
          WHERE partition = %(partition)s AND (retry_at IS NULL OR retry_at <= clock_timestamp())
          ORDER BY job_id
          LIMIT %(limit)s
      )
    RETURNING job_id
)
SELECT ARRAY(SELECT job_id FROM taken),
       (SELECT extract(epoch FROM min(retry_at) - clock_timestamp())::float8
        FROM outbox_dirty_jobs WHERE partition = %(partition)s AND retry_at > clock_timestamp())

-- name: batch_commit
-- The checkpoint and the throughput count: the batch's last statement (its variant states, job
-- states and dead letters are written before, in the same transaction).
WITH advanced AS (
    UPDATE outbox_checkpoints
    SET done_snapshot = %(done)s::pg_snapshot,
        target_snapshot = %(target)s::pg_snapshot,
        last_txid = %(after_txid)s::xid8,
        last_event_id = %(after_event_id)s,
        events_applied = events_applied + %(event_count)s,
        last_applied_event_id = coalesce(%(last_applied_event_id)s, last_applied_event_id),
        last_applied_at = CASE WHEN %(event_count)s > 0 THEN clock_timestamp() ELSE last_applied_at END,
        updated_at = clock_timestamp()
    WHERE partition = %(partition)s
    RETURNING updated_at
), counted AS (
    INSERT INTO outbox_throughput AS t (partition, bucket, events)
    SELECT %(partition)s, date_bin('10 seconds', clock_timestamp(), '2000-01-01'), %(event_count)s
    WHERE %(event_count)s > 0
    ON CONFLICT (partition, bucket) DO UPDATE SET events = t.events + excluded.events
)
SELECT (SELECT updated_at FROM advanced) AS committed_at

-- name: jobs_write
-- Writing job state: the one statement that does it, for the worker's batches and every
-- operation alike. Jobs of a partition that is catching up (deferred_partitions) wait in
-- outbox_dirty_jobs for the catch-up to close: a job shows only states of complete snapshots. A
-- job row that another transaction holds locked is not waited for (SKIP LOCKED): the job goes to
-- outbox_dirty_jobs, to be tried again a second later, and the rest go on. Flags of the jobs
-- folded are cleared, or set with the reason. Held jobs are left alone. The columns' own types
-- are written through their cast functions. Returns what was written (with each job's state
-- before and after: its transition, which transitions_append writes), deferred and blocked.
WITH writer AS MATERIALIZED (
    -- Who writes: outbox_guard_job_state lets the processor through (the token of migration 0013:
    -- a worker older than it is refused, rather than writing job state without transitions or
    -- without their trace context).
    SELECT set_config('outbox.job_writer', 'processor:13', true) AS name
), incoming AS MATERIALIZED (
    SELECT t.*
    FROM unnest(%(job_ids)b::uuid[], %(job_statuses)b::text[], %(job_steps)b::text[]) AS t (job_id, status, current_step)
    -- A held job's row is the application's until the hold is released (outbox.hold_job).
    WHERE NOT EXISTS (SELECT FROM outbox_job_holds AS h WHERE h.job_id = t.job_id)
), deferred AS MATERIALIZED (
    SELECT DISTINCT job_id
    FROM unnest(%(folded_job_ids)b::uuid[] || %(flag_job_ids)b::uuid[]) AS t (job_id)
    WHERE cardinality(%(deferred_partitions)b::integer[]) > 0
      AND outbox_partition_of(job_id) = ANY(%(deferred_partitions)b::integer[])
), changing AS MATERIALIZED (
    -- Only the rows whose state differs are written, and locked. The row's version as this
    -- statement's snapshot saw it (xmin) is kept for the lock below.
    SELECT i.*, j.xmin AS seen_xmin, j.status::text AS from_status, j.current_step::text AS from_step
    FROM incoming AS i
    JOIN jobs AS j USING (job_id)
    WHERE (j.status::text, j.current_step::text) IS DISTINCT FROM (i.status, i.current_step)
      AND NOT EXISTS (SELECT FROM deferred AS d WHERE d.job_id = i.job_id)
      AND (SELECT name FROM writer) = 'processor:13'  -- set before any row is written
), locked AS MATERIALIZED (
    -- A row changed since the snapshot (a hold committed meanwhile: the lock takes the newest
    -- version, and the hold's check above did not see it) is not written now but retried, under a
    -- snapshot that sees the change: the xmin check is made again on the version locked.
    SELECT j.job_id
    FROM jobs AS j
    JOIN changing AS c USING (job_id)
    WHERE j.xmin = c.seen_xmin
    FOR NO KEY UPDATE OF j SKIP LOCKED
), updated AS (
    UPDATE jobs AS j
    SET status = outbox_job_status(c.status), current_step = outbox_job_step(c.current_step), updated_at = now()
    FROM changing AS c
    JOIN locked AS l USING (job_id)
    WHERE j.job_id = c.job_id
    RETURNING j.job_id, c.from_status, c.from_step, j.status::text AS to_status, j.current_step::text AS to_step
), blocked AS MATERIALIZED (
    SELECT c.job_id FROM changing AS c WHERE NOT EXISTS (SELECT FROM locked AS l WHERE l.job_id = c.job_id)
), queued AS (
    INSERT INTO outbox_dirty_jobs AS d (partition, job_id, retry_at)
    SELECT outbox_partition_of(job_id), job_id, NULL FROM deferred
    UNION ALL
    SELECT outbox_partition_of(job_id), job_id, clock_timestamp() + interval '1 second' FROM blocked
    ON CONFLICT (partition, job_id) DO UPDATE SET retry_at = excluded.retry_at
), flags_cleared AS (
    DELETE FROM outbox_job_flags AS f
    WHERE f.job_id = ANY(%(folded_job_ids)b::uuid[])
      AND NOT EXISTS (SELECT FROM deferred AS d WHERE d.job_id = f.job_id)
), flags_set AS (
    INSERT INTO outbox_job_flags AS f (job_id, reason)
    SELECT t.job_id, t.reason
    FROM unnest(%(flag_job_ids)b::uuid[], %(flag_reasons)b::text[]) AS t (job_id, reason)
    WHERE NOT EXISTS (SELECT FROM deferred AS d WHERE d.job_id = t.job_id)
    ON CONFLICT (job_id) DO UPDATE SET reason = excluded.reason, flagged_at = now()
        WHERE f.reason <> excluded.reason
)
SELECT (SELECT count(*) FROM updated), (SELECT count(*) FROM deferred), ARRAY(SELECT job_id FROM blocked ORDER BY 1),
       -- The transitions (transitions_append writes them, last thing before the commit).
       ARRAY(SELECT job_id FROM updated ORDER BY job_id),
       ARRAY(SELECT from_status FROM updated ORDER BY job_id),
       ARRAY(SELECT from_step FROM updated ORDER BY job_id),
       ARRAY(SELECT to_status FROM updated ORDER BY job_id),
       ARRAY(SELECT to_step FROM updated ORDER BY job_id)

-- name: transitions_append
-- The transitions of the job states this transaction wrote (jobs_write), as its last statement
-- before the commit: under the lock that orders transitions (migration 0012), held from here to the
-- commit only, so that nothing this transaction may still wait for (an application's row) is
-- waited for while every other writer of transitions waits behind it. Holds' staged transitions
-- are published first (a held job's next transition follows its hold's); the whole is announced
-- once (PostgreSQL folds a transaction's identical notifications). Takes the lock only when there
-- is something to write. Each carries the trace context of the event that caused it (0013; NULL
-- trace_parents: none).
WITH incoming AS MATERIALIZED (
    SELECT *
    FROM unnest(%(job_ids)s::uuid[], %(from_statuses)s::text[], %(from_steps)s::text[],
                %(to_statuses)s::text[], %(to_steps)s::text[], %(trace_parents)s::text[]) WITH ORDINALITY
         AS t (job_id, from_status, from_step, to_status, to_step, trace_parent, n)
), published AS MATERIALIZED (
    SELECT outbox_transitions_publish() AS count
    WHERE EXISTS (SELECT FROM incoming) OR EXISTS (SELECT FROM outbox_job_transitions_staged)
), appended AS (
    INSERT INTO outbox_job_transitions
        (job_id, partition, from_status, from_step, to_status, to_step, written_by, trace_parent)
    SELECT i.job_id, outbox_partition_of(i.job_id), i.from_status, i.from_step, i.to_status, i.to_step, 'processor',
           i.trace_parent
    FROM (SELECT * FROM incoming ORDER BY n) AS i
    -- After the staged ones (the lock is taken there, or here when nothing was staged).
    WHERE (SELECT count(*) FROM published) >= 0 AND outbox_transitions_lock()
    RETURNING 1
)
SELECT (SELECT count(*) FROM appended), (SELECT sum(count) FROM published),
       (SELECT pg_notify('outbox_transitions', '')
        WHERE EXISTS (SELECT FROM appended) OR (SELECT sum(count) FROM published) > 0) IS NULL

-- name: jobs_lock_holders
-- Who holds each job row locked: the transaction in the row's xmax (a row lock, or an update not
-- yet committed) and its backend. A lock shared by several transactions (a multixact) shows no
-- backend.
SELECT j.job_id, a.pid, a.application_name, a.state, a.xact_start
FROM jobs AS j
LEFT JOIN pg_locks AS l
       ON l.locktype = 'transactionid' AND l.transactionid = j.xmax AND l.mode = 'ExclusiveLock' AND l.granted
LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE j.job_id = ANY(%(job_ids)s::uuid[])
ORDER BY j.job_id

-- name: session_configure
-- The worker's own session limits (processor.settings): a stopped worker's session is ended by
-- the server, which releases its consumer lock.
SELECT set_config('statement_timeout', %(statement_timeout)s, false),
       set_config('idle_session_timeout', %(session_timeout)s, false),
       set_config('idle_in_transaction_session_timeout', %(session_timeout)s, false)

-- name: consumer_lock_try
-- Session-level: held by the connection that writes, released when it closes or dies.
SELECT pg_try_advisory_lock(%(lock_class)s, %(partition)s)

-- name: consumer_lock_release
SELECT pg_advisory_unlock(%(lock_class)s, %(partition)s)

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

-- name: backlog_counts
SELECT (SELECT count(*) FROM outbox_dead_letters WHERE discarded_at IS NULL) AS dead_letters,
       (SELECT count(*) FROM outbox_job_flags) AS flagged_jobs,
       (SELECT count(*) FROM outbox_dirty_jobs WHERE partition = %(partition)s) AS jobs_awaiting_fold,
       pg_total_relation_size('outbox_events') AS outbox_bytes,
       (SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'outbox_events'::regclass) AS outbox_rows_estimate,
       (SELECT coalesce(sum(events), 0)
        FROM outbox_throughput
        WHERE partition = %(partition)s AND bucket > clock_timestamp() - interval '70 seconds'
          AND bucket <= clock_timestamp() - interval '10 seconds') / 60.0 AS events_per_second,
       (SELECT last_applied_event_id FROM outbox_checkpoints WHERE partition = %(partition)s),
       (SELECT last_applied_at FROM outbox_checkpoints WHERE partition = %(partition)s)

-- name: backlog_workers
-- Every connected worker of this database, from its application_name (processor.worker).
SELECT pid, application_name, backend_start, state, clock_timestamp() - state_change AS in_state_for
FROM pg_stat_activity
WHERE datname = current_database()
  AND application_name LIKE 'outbox-worker:%%'
ORDER BY backend_start

-- Operations: replay, verify, dead letters, prune, a pipeline change. Each changes state in
-- transactions that first lock checkpoint rows (every partition's, checkpoints_lock_all; prune only
-- its partition's), so it sees exactly what the workers have applied and they wait for it: nothing
-- is applied twice or missed around them, and `outbox repartition` waits for them as they wait for it.

-- name: jobs_all
SELECT job_id FROM jobs WHERE %(partition)s::integer IS NULL OR outbox_partition_of(job_id) = %(partition)s
ORDER BY job_id

-- name: jobs_with_events_since
SELECT DISTINCT job_id
FROM outbox_events
WHERE (%(partition)s::integer IS NULL OR partition = %(partition)s) AND created_at >= %(since)s
  AND job_id IS NOT NULL
ORDER BY job_id

-- name: jobs_existing
SELECT job_id FROM jobs WHERE job_id = ANY(%(job_ids)s::uuid[]) ORDER BY job_id

-- name: replay_variants_of_jobs
-- Every variant that belongs or belonged to the jobs, from every place that knows of it.
SELECT variant_id FROM outbox_variant_states WHERE job_id = ANY(%(job_ids)s::uuid[])
UNION
SELECT variant_id FROM outbox_variant_baseline WHERE job_id = ANY(%(job_ids)s::uuid[])
UNION
SELECT job_variants_id FROM jobs_variants WHERE job_id = ANY(%(job_ids)s::uuid[])

-- name: variant_states_rebuild
-- Replay's rebuild of these variants, under every checkpoint's lock (checkpoints_lock_all): each
-- one's state becomes the newest (outbox_variant_states_newest) of its baseline (what prune folded)
-- and its applied events, each event judged applied by its own partition's checkpoint, so that a
-- variant that moved between jobs of two partitions is rebuilt from both. Discarded dead letters
-- and events with no place in the order (no job, or a version capture never issued) never count;
-- a dead letter (or an unreadable event) gives a problem state with its reason, as the drain made
-- it. A variant with nothing at all loses its stored state. Returns the jobs the variants were in before and are in
-- now: each of them is folded again.
WITH issued AS MATERIALIZED (
    SELECT outbox_versions_issued() AS versions
), candidates AS (
    SELECT (b.variant_id, b.job_id, b.version, b.status, b.step, b.removed, b.problem, b.event_id, NULL)::outbox_variant_states AS state
    FROM outbox_variant_baseline AS b
    WHERE b.variant_id = ANY(%(variant_ids)s::uuid[])
    UNION ALL
    -- As the drain made it: a dead letter is the problem state of its version (whatever its payload
    -- says now: `dead-letters retry` is what applies a fixed one), else the decoded state.
    SELECT (e.variant_id, e.job_id, e.variant_version,
            CASE WHEN usable THEN d.status END, CASE WHEN usable THEN d.step END, usable AND d.removed,
            CASE WHEN NOT usable THEN outbox_unreadable_problem(e.event_id, dl.reason) END,
            e.event_id, NULL)::outbox_variant_states
    FROM outbox_events AS e
    JOIN outbox_checkpoints AS c ON c.partition = e.partition
    CROSS JOIN issued AS i
    CROSS JOIN LATERAL outbox_event_decode(
        e.event_type, e.schema_version, e.job_id, e.variant_id, e.variant_version, e.payload, i.versions) AS d
    LEFT JOIN outbox_dead_letters AS dl ON dl.event_id = e.event_id
    CROSS JOIN LATERAL (SELECT dl.event_id IS NULL AND d.readable AS usable) AS u
    WHERE e.variant_id = ANY(%(variant_ids)s::uuid[])
      AND e.job_id IS NOT NULL
      AND e.variant_version BETWEEN 1 AND i.versions
      AND outbox_event_applied(e.txid, e.event_id, c.done_snapshot, c.target_snapshot, c.last_txid, c.last_event_id)
      -- Discarded, or holding its job (it has no place in the order): never a state.
      AND dl.discarded_at IS NULL
      AND NOT coalesce(dl.holds_job, false)
), rebuilt AS MATERIALIZED (
    SELECT * FROM outbox_variant_states_newest(ARRAY(SELECT state FROM candidates))
), before AS MATERIALIZED (
    SELECT variant_id, job_id FROM outbox_variant_states WHERE variant_id = ANY(%(variant_ids)s::uuid[]) FOR UPDATE
), dropped AS (
    DELETE FROM outbox_variant_states
    WHERE variant_id = ANY(%(variant_ids)s::uuid[]) AND variant_id NOT IN (SELECT variant_id FROM rebuilt)
), replaced AS (
    INSERT INTO outbox_variant_states AS s (variant_id, job_id, version, status, step, removed, problem, event_id)
    SELECT variant_id, job_id, version, status, step, removed, problem, event_id FROM rebuilt
    ON CONFLICT (variant_id) DO UPDATE
        SET job_id = excluded.job_id, version = excluded.version, status = excluded.status, step = excluded.step,
            removed = excluded.removed, problem = excluded.problem, event_id = excluded.event_id, moved_from = NULL
)
SELECT job_id FROM before
UNION
SELECT job_id FROM rebuilt

-- name: dirty_jobs_add
INSERT INTO outbox_dirty_jobs (partition, job_id)
SELECT %(partition)s, unnest(%(job_ids)s::uuid[])
ON CONFLICT DO NOTHING

-- name: jobs_get
SELECT job_id, status::text, current_step::text FROM jobs WHERE job_id = ANY(%(job_ids)s::uuid[])

-- name: verify_in_flight
-- Work in flight (pending: outbox_events_pending and outbox_dirty_jobs) is not drift: its jobs and
-- variants are left out of the comparison.
SELECT ARRAY(SELECT job_id FROM outbox_events_pending(NULL) WHERE job_id IS NOT NULL
             UNION SELECT job_id FROM outbox_dirty_jobs),
       ARRAY(SELECT DISTINCT variant_id FROM outbox_events_pending(NULL) WHERE variant_id IS NOT NULL)

-- name: verify_variant_drift
-- Variants whose row in jobs_variants and whose event-derived state disagree (in flight left out),
-- and stored states at a version capture never issued (only a hand-written event could put one
-- there).
WITH states AS (
    SELECT * FROM outbox_variant_states WHERE NOT removed
)
SELECT coalesce(v.job_variants_id, s.variant_id) AS variant_id,
       v.job_id, v.status::text, v.current_step::text,
       s.job_id, s.status, s.step
FROM jobs_variants AS v
FULL JOIN states AS s ON s.variant_id = v.job_variants_id
WHERE (v.job_variants_id IS NULL OR s.variant_id IS NULL
       OR (v.job_id, v.status::text, v.current_step::text) IS DISTINCT FROM (s.job_id, s.status, s.step)
       OR s.version > (SELECT outbox_versions_issued()))
  AND coalesce(v.job_variants_id, s.variant_id) <> ALL(%(in_flight_variants)s::uuid[])
  AND coalesce(v.job_id, s.job_id) IS NOT NULL
  AND (%(partition)s::integer IS NULL OR outbox_partition_of(coalesce(v.job_id, s.job_id)) = %(partition)s)
ORDER BY 1
LIMIT %(limit)s

-- name: verify_stuck_jobs
-- The original symptom: every variant is done at the final step, yet the job is not done.
SELECT j.job_id, j.status::text, j.current_step::text
FROM jobs AS j
WHERE j.status::text IS DISTINCT FROM 'done'
  AND (%(partition)s::integer IS NULL OR outbox_partition_of(j.job_id) = %(partition)s)
  AND j.job_id <> ALL(%(in_flight_jobs)s::uuid[])
  AND EXISTS (SELECT 1 FROM jobs_variants AS v WHERE v.job_id = j.job_id)
  AND NOT EXISTS (
      SELECT 1 FROM jobs_variants AS v
      WHERE v.job_id = j.job_id
        AND (v.status::text IS DISTINCT FROM 'done' OR v.current_step::text IS DISTINCT FROM %(final_step)s)
  )
ORDER BY j.job_id
LIMIT %(limit)s

-- name: verify_job_ids_after
SELECT DISTINCT job_id
FROM outbox_variant_states
WHERE job_id > %(after)s AND (%(partition)s::integer IS NULL OR outbox_partition_of(job_id) = %(partition)s)
ORDER BY job_id
LIMIT %(limit)s

-- name: job_flags_list
-- Flagged jobs with their reasons, and the dead letters that hold them (0009).
SELECT f.job_id, f.reason, f.flagged_at,
       ARRAY(SELECT d.event_id FROM outbox_dead_letters AS d
             WHERE d.job_id = f.job_id AND d.discarded_at IS NULL ORDER BY d.event_id)
FROM outbox_job_flags AS f
WHERE %(partition)s::integer IS NULL OR outbox_partition_of(f.job_id) = %(partition)s
ORDER BY f.job_id
LIMIT %(limit)s

-- name: variant_resync
-- Repair: append an event carrying the variant row's current state, or its removal from the job
-- the events knew when the row is gone or detached, under the row's lock so that its version
-- orders after every change already made to it.
WITH locked AS (
    SELECT job_variants_id, job_id, status::text, current_step::text  -- an enum or a domain: as text
    FROM jobs_variants
    WHERE job_variants_id = %(variant_id)s
    FOR UPDATE
)
SELECT outbox_append_variant_event('variant_changed', job_id, job_variants_id, status, current_step)
FROM locked
WHERE job_id IS NOT NULL
UNION ALL
SELECT outbox_append_variant_event('variant_removed', %(state_job_id)s, %(variant_id)s, NULL, NULL)
WHERE %(state_job_id)s::uuid IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM locked WHERE job_id IS NOT NULL)

-- name: dead_letters_list
SELECT d.event_id, d.partition, d.job_id, d.variant_id, d.reason, d.parked_at, d.discarded_at,
       e.event_type, e.schema_version, e.created_at, d.holds_job
FROM outbox_dead_letters AS d
LEFT JOIN outbox_events AS e USING (event_id)
WHERE (%(include_discarded)s OR d.discarded_at IS NULL)
ORDER BY d.event_id
LIMIT %(limit)s

-- name: dead_letter_event_get
SELECT e.event_id, e.txid::text, e.event_type, e.schema_version, e.job_id, e.variant_id,
       e.variant_version, outbox_event_payload(e.payload), e.created_at,
       e.variant_version BETWEEN 1 AND (SELECT outbox_versions_issued()), d.discarded_at
FROM outbox_dead_letters AS d
JOIN outbox_events AS e USING (event_id)
WHERE d.event_id = %(event_id)s

-- name: dead_letter_update_reason
UPDATE outbox_dead_letters SET reason = %(reason)s, holds_job = %(holds_job)s, parked_at = now()
WHERE event_id = %(event_id)s

-- name: dead_letter_delete
DELETE FROM outbox_dead_letters WHERE event_id = %(event_id)s

-- name: dead_letter_discard
-- Idempotent: an already discarded letter keeps its first discarded_at and is still returned.
UPDATE outbox_dead_letters SET discarded_at = coalesce(discarded_at, now())
WHERE event_id = %(event_id)s
RETURNING job_id, variant_id

-- name: prune_chunk
-- One round of `outbox prune` in partition %(partition)s, under its checkpoint's lock: the events
-- to remove (applied, older than the cutoff, not a dead letter waiting for retry or discard) are
-- folded into outbox_variant_baseline (the newest of each variant wins, as everywhere: replay
-- starts from there), then deleted with their discarded dead letters.
WITH issued AS MATERIALIZED (
    SELECT outbox_versions_issued() AS versions
), doomed AS MATERIALIZED (
    SELECT e.*, dl.event_id IS NOT NULL AS discarded
    FROM outbox_events AS e
    LEFT JOIN outbox_dead_letters AS dl USING (event_id)
    WHERE e.partition = %(partition)s
      AND e.created_at < %(cutoff)s
      AND pg_visible_in_snapshot(e.txid, %(done)s::pg_snapshot)
      AND (dl.event_id IS NULL OR dl.discarded_at IS NOT NULL)
    ORDER BY e.event_id
    LIMIT %(limit)s
), baseline AS MATERIALIZED (
    SELECT outbox_variant_baseline_merge(ARRAY(
        SELECT (e.variant_id, e.job_id, e.variant_version,
                CASE WHEN d.readable THEN d.status END, CASE WHEN d.readable THEN d.step END,
                d.readable AND d.removed,
                CASE WHEN NOT d.readable THEN outbox_unreadable_problem(e.event_id, NULL) END,
                e.event_id, NULL)::outbox_variant_states
        FROM doomed AS e
        CROSS JOIN issued AS i
        CROSS JOIN LATERAL outbox_event_decode(
            e.event_type, e.schema_version, e.job_id, e.variant_id, e.variant_version, e.payload, i.versions) AS d
        WHERE NOT e.discarded AND e.variant_id IS NOT NULL AND e.job_id IS NOT NULL
          AND e.variant_version BETWEEN 1 AND i.versions
    )) AS merged
), letters AS (
    DELETE FROM outbox_dead_letters WHERE event_id IN (SELECT event_id FROM doomed WHERE discarded)
), deleted AS (
    DELETE FROM outbox_events WHERE event_id IN (SELECT event_id FROM doomed) RETURNING 1
)
SELECT (SELECT count(*) FROM deleted), (SELECT merged FROM baseline)

-- name: transitions_prune
-- One round of pruning job transitions: those written before the cutoff that every subscription
-- has acknowledged (at or below its position) and none has parked or is retrying. With no
-- subscription, every transition before the cutoff goes.
WITH kept_from AS MATERIALIZED (
    SELECT min(position) AS position FROM outbox_subscriptions
), doomed AS (
    SELECT t.transition_id
    FROM outbox_job_transitions AS t
    WHERE t.transitioned_at < %(cutoff)s
      AND t.transition_id <= coalesce((SELECT position FROM kept_from), 9223372036854775807)
      AND NOT EXISTS (SELECT FROM outbox_subscription_failures AS f WHERE f.transition_id = t.transition_id)
    ORDER BY t.transition_id
    LIMIT %(limit)s
)
DELETE FROM outbox_job_transitions WHERE transition_id IN (SELECT transition_id FROM doomed)

-- name: throughput_prune
DELETE FROM outbox_throughput WHERE bucket < clock_timestamp() - interval '1 day'

-- name: clock_minus
SELECT clock_timestamp() - %(interval)s::interval

-- name: snapshot_current
SELECT pg_current_snapshot()::text

-- name: rebase_lock_events
-- Writers wait (they do not fail) until the rebase commits; events already written are committed.
-- No statement timeout for this transaction: re-marking a large outbox may take a while.
SELECT set_config('statement_timeout', '0', true);
LOCK TABLE outbox_events IN EXCLUSIVE MODE

-- name: rebase_events_from_another_cluster
-- Transaction ids from the cluster the database was restored from mean nothing here: mark every
-- event whose id is beyond this cluster's counter as applied (a txid below any snapshot).
UPDATE outbox_events SET txid = '1'
WHERE txid >= pg_snapshot_xmax(pg_current_snapshot())

-- name: rebase_checkpoint
-- rebase_pending stays set until every job has been rebuilt (processor/rebase.py), so a crash in
-- between resumes the rebuild instead of losing it.
UPDATE outbox_checkpoints
SET done_snapshot = pg_current_snapshot(), target_snapshot = NULL, last_txid = '0', last_event_id = 0,
    cluster_id = (SELECT system_identifier FROM pg_control_system()), rebase_pending = true,
    updated_at = clock_timestamp()
WHERE partition = %(partition)s

-- name: rebase_done
UPDATE outbox_checkpoints SET rebase_pending = false WHERE partition = %(partition)s

-- name: cluster_check
-- The checkpoint's cluster, this cluster, and whether a rebuild is still pending. A checkpoint with
-- no cluster yet (first run) is claimed for this one.
WITH claimed AS (
    UPDATE outbox_checkpoints SET cluster_id = (SELECT system_identifier FROM pg_control_system())
    WHERE partition = %(partition)s AND cluster_id IS NULL
    RETURNING cluster_id
)
SELECT coalesce((SELECT cluster_id FROM claimed), c.cluster_id),
       (SELECT system_identifier FROM pg_control_system()),
       c.rebase_pending
FROM outbox_checkpoints AS c
WHERE c.partition = %(partition)s

-- name: dead_letters_count
SELECT count(*) FROM outbox_dead_letters WHERE discarded_at IS NULL

-- Metrics (processor/metrics.py). The gauges that scan are read by one worker: the one whose
-- metrics refresh connection holds this lock (session-level: it goes with the connection, and
-- another worker's refresh takes it at its next try).

-- name: metrics_lock_try
SELECT pg_try_advisory_lock(%(lock_class)s, 0)

-- name: dead_letters_count_by_class
-- Dead letters waiting for retry or discard, by the class of their reason: processor.decode's
-- DeadLetterClass (the classification's one owner) passes each class with the prefix its reasons
-- begin with, in order; the last, 'other', has the empty prefix.
SELECT c.class, count(*)
FROM outbox_dead_letters AS d
CROSS JOIN LATERAL (
    SELECT t.class
    FROM unnest(%(classes)s::text[], %(prefixes)s::text[]) WITH ORDINALITY AS t (class, prefix, n)
    WHERE starts_with(d.reason, t.prefix)
    ORDER BY t.n
    LIMIT 1
) AS c
WHERE d.discarded_at IS NULL
GROUP BY c.class

-- name: job_flags_count
SELECT count(*) FROM outbox_job_flags

-- name: event_writers_list
-- The open transactions that wrote outbox events, and how long each has been open.
-- Its events are invisible until it ends: each batch's target snapshot lists it as in progress
-- (xip), and events_apply leaves its events for the batch whose snapshot first sees it committed,
-- so it holds back its own events (and its jobs' state), never other transactions'. A transaction
-- that wrote to outbox_events holds a ROW EXCLUSIVE lock on it until it ends, and an ExclusiveLock
-- on its own transaction id; a prepared transaction keeps both (no backend; counted from its
-- PREPARE TRANSACTION). One read of pg_locks.
WITH locks AS MATERIALIZED (
    SELECT locktype, database, relation, transactionid, virtualtransaction, pid, mode, granted FROM pg_locks
), writers AS (
    SELECT DISTINCT virtualtransaction
    FROM locks
    WHERE locktype = 'relation'
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND relation = 'outbox_events'::regclass
      AND mode = 'RowExclusiveLock' AND granted
)
-- One row per such transaction: its id and its age, NULL when this login may not see when it began
-- (another login's, without pg_read_all_stats): the caller then counts from when it first saw it.
SELECT l.transactionid::text,
       extract(epoch FROM clock_timestamp() - coalesce(a.xact_start, x.prepared))::float8
FROM locks AS l
JOIN writers AS w USING (virtualtransaction)
LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
LEFT JOIN pg_prepared_xacts AS x ON x.transaction = l.transactionid
WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted
  AND l.pid IS DISTINCT FROM pg_backend_pid()

-- name: wakeup_listen
-- OUTBOX_WAKEUP=notify, on the active worker's session: the server delivers a notification when
-- the session is idle, or with the reply to its next statement (psycopg keeps those for later).
LISTEN outbox_wakeup

-- name: wakeup_trigger_enabled
-- Whether writers notify (schema/migrations/0003_notify_wakeup.sql): the trigger exists and is not
-- disabled (ALTER TABLE ... DISABLE TRIGGER).
SELECT EXISTS (
    SELECT FROM pg_trigger
    WHERE tgrelid = to_regclass('jobs_variants') AND tgname = 'outbox_wakeup_notify' AND tgenabled <> 'D'
)

-- name: wakeup_enable
SELECT outbox_wakeup_enable()

-- name: wakeup_disable
SELECT outbox_wakeup_disable()

-- name: partitions_get
SELECT partitions FROM outbox_partitioning

-- name: members_join
-- Every worker session holds this lock in shared mode: the number of holders is the number of
-- live workers, which each uses to take its fair share of the partitions. It goes with the session.
SELECT pg_advisory_lock_shared(%(lock_class)s, 0)

-- name: members_count
SELECT count(*)
FROM pg_locks
WHERE locktype = 'advisory'
  AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid = %(lock_class)s::int::oid
  AND objid = 0
  AND objsubid = 2

-- name: consumer_locks_holders
-- Each partition's consumer, if any: for `outbox backlog` and the standby log.
SELECT l.objid::int AS partition, a.pid, a.application_name, a.backend_start
FROM pg_locks AS l
JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory'
  AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %(lock_class)s::int::oid
  AND l.objsubid = 2
  AND l.objid::int >= 0  -- not the migrations' lock (key -1)
ORDER BY 1

-- name: repartition_hold_writers
-- SHARE blocks every INSERT into the outbox (and waits for the transactions that already wrote
-- events to end), while the workers keep reading and applying: once they have applied everything,
-- nothing new can arrive until the count has changed.
LOCK TABLE outbox_events IN SHARE MODE

-- name: repartition_pending
-- What keeps the outbox from being drained, per partition: catch-ups in progress and jobs waiting
-- to be folded (events not applied yet are counted by events_pending_summary).
SELECT c.partition, c.target_snapshot IS NOT NULL,
       (SELECT count(*) FROM outbox_dirty_jobs AS d WHERE d.partition = c.partition)
FROM outbox_checkpoints AS c
ORDER BY c.partition

-- name: repartition_set
SELECT outbox_partitions_set(%(partitions)s)

-- name: repartition_relabel_events
-- Applied events keep their meaning for replay, verify and prune under the new count.
UPDATE outbox_events
SET partition = outbox_partition_of(job_id)
WHERE job_id IS NOT NULL
  AND partition <> outbox_partition_of(job_id)

-- name: repartition_relabel_dead_letters
UPDATE outbox_dead_letters
SET partition = outbox_partition_of(job_id)
WHERE job_id IS NOT NULL
  AND partition <> outbox_partition_of(job_id)

-- name: repartition_checkpoints
-- Every partition starts from this transaction's snapshot: every event committed before it is
-- applied (the outbox is drained), and none can be written until this transaction ends. New
-- checkpoints fold with the current fold configuration.
WITH removed AS (
    DELETE FROM outbox_checkpoints WHERE partition >= %(partitions)s
)
INSERT INTO outbox_checkpoints AS c (partition, done_snapshot, cluster_id, updated_at, fold_config_version)
SELECT p, pg_current_snapshot(), (SELECT max(cluster_id) FROM outbox_checkpoints), clock_timestamp(),
       (SELECT version FROM outbox_fold_config)
FROM generate_series(0, %(partitions)s - 1) AS p
ON CONFLICT (partition) DO UPDATE
    SET done_snapshot = excluded.done_snapshot,
        target_snapshot = NULL,
        last_txid = '0',
        last_event_id = 0,
        updated_at = excluded.updated_at

-- name: transaction_lock_timeout
SELECT set_config('lock_timeout', %(lock_timeout)s, true)

-- name: transaction_statement_timeout
SELECT set_config('statement_timeout', %(statement_timeout)s, true)

-- name: dead_letters_partitions
SELECT event_id, partition FROM outbox_dead_letters WHERE event_id = ANY(%(event_ids)s::bigint[])

-- name: jobs_in_partition
SELECT job_id
FROM unnest(%(job_ids)s::uuid[]) AS t (job_id)
WHERE outbox_partition_of(job_id) = %(partition)s
ORDER BY job_id

-- name: transaction_snapshot
-- First statement of a transaction whose statements must all see one snapshot (verify, backlog).
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY

-- The fold configuration (processor/fold_config.py, migration 0009).

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
SELECT (SELECT version FROM changed), (SELECT count(*) FROM queued)

-- name: variant_steps_used
-- The steps jobs_variants uses, with how many variants each, for checking a pipeline.
SELECT current_step::text, count(*)
FROM jobs_variants
WHERE current_step IS NOT NULL
GROUP BY current_step
ORDER BY count(*) DESC

-- name: prune_lock_events
-- The lock prune's DELETE takes anyway, taken first (see processor/prune.py).
LOCK TABLE outbox_events IN ROW EXCLUSIVE MODE

-- name: repartition_serialise
-- One repartition at a time (transaction-level; the migrations' lock is key -1).
SELECT pg_advisory_xact_lock(%(lock_class)s, -2)

-- name: repartition_relabel_dirty_jobs
-- Jobs waiting to be folded go with their job's new partition (the outbox is drained, so there are
-- normally none; one queued by a worker of a partition being removed is not left behind).
WITH moved AS (
    DELETE FROM outbox_dirty_jobs WHERE partition <> outbox_partition_of(job_id) RETURNING job_id, queued_at
)
INSERT INTO outbox_dirty_jobs (partition, job_id, queued_at)
SELECT outbox_partition_of(job_id), job_id, min(queued_at) FROM moved GROUP BY job_id
ON CONFLICT (partition, job_id) DO NOTHING

-- name: app_column_types
-- The types of the application's columns that the product reads and writes (processor/app_schema.py):
-- as format_type() spells it; the type's own name, qualified (what a cast function returns: bpchar,
-- not "character", which means char(1)); the length limit, through domains; and whether the type
-- (through domains) is a string type, to which text is assigned as it is, length checked.
WITH RECURSIVE col AS (
    SELECT c.relname, a.attname, a.atttypid, a.atttypmod
    FROM pg_attribute AS a
    JOIN pg_class AS c ON c.oid = a.attrelid
    WHERE a.attrelid IN (to_regclass('jobs'), to_regclass('jobs_variants'))
      AND a.attname IN ('status', 'current_step')
      AND NOT a.attisdropped
), base AS (  -- down through domains: a domain's base may be a domain too
    SELECT col.relname, col.attname, col.atttypid AS typid, col.atttypmod AS typmod
    FROM col
    UNION ALL
    SELECT b.relname, b.attname, t.typbasetype, t.typtypmod
    FROM base AS b
    JOIN pg_type AS t ON t.oid = b.typid AND t.typtype = 'd'
)
SELECT col.relname, col.attname, format_type(col.atttypid, col.atttypmod),
       quote_ident(n.nspname) || '.' || quote_ident(t.typname),
       (SELECT min(information_schema._pg_char_max_length(b.typid, b.typmod)) FROM base AS b
        WHERE b.relname = col.relname AND b.attname = col.attname),
       (SELECT bt.typcategory = 'S' FROM base AS b JOIN pg_type AS bt ON bt.oid = b.typid
        WHERE b.relname = col.relname AND b.attname = col.attname AND bt.typtype <> 'd')
FROM col
JOIN pg_type AS t ON t.oid = col.atttypid
JOIN pg_namespace AS n ON n.oid = t.typnamespace
ORDER BY col.relname, col.attname

-- name: app_cast_function_get
-- A cast function's return type (as app_column_types names it), its body, and who may execute it ("-": PUBLIC).
SELECT (SELECT quote_ident(n.nspname) || '.' || quote_ident(t.typname)
        FROM pg_type AS t JOIN pg_namespace AS n ON n.oid = t.typnamespace WHERE t.oid = p.prorettype),
       p.prosrc,
       ARRAY(SELECT CASE WHEN a.grantee = 0 THEN '-' ELSE (SELECT rolname FROM pg_roles WHERE oid = a.grantee) END
             FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) AS a
             WHERE a.privilege_type = 'EXECUTE')
FROM pg_proc AS p
WHERE p.oid = to_regprocedure(%(name)s || '(text)')

-- name: product_triggers_get
-- The product's triggers on the application's tables, and whether each fires (processor/schema_check.py).
SELECT c.relname, t.tgname, t.tgenabled
FROM pg_trigger AS t
JOIN pg_class AS c ON c.oid = t.tgrelid
WHERE t.tgrelid IN (to_regclass('jobs'), to_regclass('jobs_variants'))
  AND t.tgname LIKE 'outbox\_%%'
  AND NOT t.tgisinternal

-- name: app_triggers_get
-- Triggers on jobs_variants other than the product's, with their function, its text (prosrc; the
-- whole definition for a SQL-standard body, whose prosrc is empty) and the trigger's arguments.
SELECT t.tgname, p.oid::regprocedure::text,
       CASE WHEN p.prosqlbody IS NOT NULL THEN pg_get_functiondef(p.oid) ELSE p.prosrc END,
       string_to_array(rtrim(encode(t.tgargs, 'escape'), E'\\000'), E'\\000')
FROM pg_trigger AS t
JOIN pg_proc AS p ON p.oid = t.tgfoid
WHERE t.tgrelid = to_regclass('jobs_variants')
  AND NOT t.tgisinternal
  AND t.tgname NOT LIKE 'outbox\_%%'
ORDER BY t.tgname

-- name: app_functions_get
-- The functions a name resolves to, as PostgreSQL would (qualified: in that schema; else through
-- the search path), the system's and the product's left out, with their text.
SELECT p.oid::regprocedure::text,
       CASE WHEN p.prosqlbody IS NOT NULL THEN pg_get_functiondef(p.oid) ELSE p.prosrc END
FROM pg_proc AS p
JOIN pg_namespace AS n ON n.oid = p.pronamespace
WHERE p.proname = (%(parts)s::text[])[cardinality(%(parts)s::text[])]
  AND CASE WHEN cardinality(%(parts)s::text[]) > 1 THEN n.nspname = (%(parts)s::text[])[cardinality(%(parts)s::text[]) - 1]
           ELSE n.nspname = ANY(current_schemas(false)) END
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND p.proname NOT LIKE 'outbox\_%%'

-- name: trigger_create_outbox_capture_variant_insert_delete
CREATE TRIGGER outbox_capture_variant_insert_delete
    AFTER INSERT OR DELETE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION outbox_capture_variant_change()

-- name: trigger_create_outbox_capture_variant_update
CREATE TRIGGER outbox_capture_variant_update
    AFTER UPDATE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION outbox_capture_variant_update()

-- name: trigger_create_outbox_guard_job_state
-- As migration 0013 creates it.
CREATE TRIGGER outbox_guard_job_state
    AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN (current_setting('outbox.job_writer', true) IS DISTINCT FROM 'processor:13')
    EXECUTE FUNCTION outbox_guard_job_state()

-- name: health_counts
SELECT (SELECT count(*) FROM outbox_job_flags), (SELECT count(*) FROM outbox_dead_letters WHERE discarded_at IS NULL),
       clock_timestamp()

-- name: app_tables_present
SELECT to_regclass('jobs') IS NOT NULL, to_regclass('jobs_variants') IS NOT NULL

-- name: app_job_id_index
-- A btree index of jobs_variants that leads with job_id, whole and valid (migration 0001 uses one
-- rather than add its own; as 0001's test, which this one must match).
SELECT i.indexrelid::regclass::text
FROM pg_index AS i
WHERE i.indrelid = 'jobs_variants'::regclass
  AND i.indkey[0] = (SELECT attnum FROM pg_attribute WHERE attrelid = 'jobs_variants'::regclass AND attname = 'job_id')
  AND i.indpred IS NULL AND i.indisvalid
  AND (SELECT relam FROM pg_class WHERE oid = i.indexrelid) = (SELECT oid FROM pg_am WHERE amname = 'btree')
ORDER BY 1
LIMIT 1

-- name: app_variants_count
SELECT count(*) FROM jobs_variants WHERE job_id IS NOT NULL

-- name: outbox_analyze
-- After a prune: fresh statistics for the planner and for `outbox backlog`'s size estimate (a
-- WARNING, not an error, for a role that does not own the table).
ANALYZE outbox_events

-- name: dead_letters_park
-- Events that cannot be applied, parked with the reason in the batch's transaction (the one that
-- moves the checkpoint past them).
WITH parked AS (
    INSERT INTO outbox_dead_letters (event_id, partition, job_id, variant_id, reason, holds_job)
    SELECT event_id, %(partition)s, job_id, variant_id, reason, holds_job
    FROM unnest(%(dead_event_ids)b::bigint[], %(dead_job_ids)b::uuid[], %(dead_variant_ids)b::uuid[],
                %(dead_reasons)b::text[], %(dead_holds_job)b::boolean[])
        AS t (event_id, job_id, variant_id, reason, holds_job)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
)
SELECT count(*) FROM parked

-- name: relation_is_jobs
-- Whether a name (its parts) resolves to the jobs table, or to a view whose query reads it.
WITH target AS (
    SELECT to_regclass(array_to_string(ARRAY(SELECT quote_ident(x) FROM unnest(%(parts)s::text[]) AS x), '.')) AS oid
)
SELECT t.oid = to_regclass('jobs')
    OR EXISTS (
        SELECT FROM pg_rewrite AS r
        JOIN pg_depend AS d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
        WHERE r.ev_class = t.oid AND d.refobjid = to_regclass('jobs')
    )
FROM target AS t

-- name: job_holds_list
-- Held jobs (0010): their state is the application's, not the fold of their variants.
SELECT job_id, status, current_step, reason, held_at
FROM outbox_job_holds
WHERE %(job_ids)s::uuid[] IS NULL OR job_id = ANY(%(job_ids)s::uuid[])
ORDER BY job_id

-- `outbox explain JOB_ID` (processor/explain.py): why one job is in its state. Every read is by a
-- key or an index, so it costs the same on an outbox of any size: jobs, jobs_variants,
-- outbox_variant_states and outbox_variant_baseline by primary key or job_id; outbox_events by
-- variant_id (a variant's entries, then its newest N) and by primary key (the inlined
-- outbox_events_pending, per event); dead letters by job_id; transitions backwards along
-- (job_id, transition_id). Only pg_locks, pg_stat_activity and pg_prepared_xacts are read whole (a
-- row per lock, per backend). Measured with EXPLAIN ANALYZE on 900,000 events (50,000 pending), 10
-- variants a job: the statements take 0.1, 15 (the pending counts), 8, 0.1 and 0.1 ms, and
-- processor.explain.explain() 29 ms in all; tests/integration/test_explain.py checks the plans on
-- 120,000 events.

-- name: job_overview_get
-- The job's row, its partition with that partition's checkpoint, its flag, and whether it waits
-- in outbox_dirty_jobs (after a catch-up, or because its row was locked: retry_at).
SELECT j.status::text AS status, j.current_step::text AS current_step, j.updated_at, p.partition,
       c.done_snapshot::text AS done_snapshot, c.target_snapshot::text AS target_snapshot,
       c.updated_at AS checkpoint_updated_at, f.reason AS flag_reason, f.flagged_at,
       d.queued_at AS awaiting_fold_since, d.retry_at AS awaiting_fold_retry_at
FROM jobs AS j
CROSS JOIN LATERAL (SELECT outbox_partition_of(j.job_id) AS partition) AS p
LEFT JOIN outbox_checkpoints AS c ON c.partition = p.partition
LEFT JOIN outbox_job_flags AS f ON f.job_id = j.job_id
LEFT JOIN outbox_dirty_jobs AS d ON d.partition = p.partition AND d.job_id = j.job_id
WHERE j.job_id = %(job_id)s

-- name: job_variants_inspect
-- Every variant that belongs or belonged to the job (found as replay_variants_of_jobs finds them):
-- its row, its stored state, its baseline (what prune folded), how many of its events the outbox
-- still has and how many of those are pending (outbox_events_pending decides, as everywhere), and
-- the open transaction, if any, that holds its row: the row's xmax is a live transaction (an UPDATE
-- not committed yet, or a row lock). What it changed, and the events capture wrote for it, are
-- invisible to every other session until it commits; whether it has written to the outbox at all is
-- told by its lock on outbox_events. A prepared transaction has no backend: its gid says which.
WITH ids AS (
    SELECT variant_id FROM outbox_variant_states WHERE job_id = %(job_id)s
    UNION
    SELECT variant_id FROM outbox_variant_baseline WHERE job_id = %(job_id)s
    UNION
    SELECT job_variants_id FROM jobs_variants WHERE job_id = %(job_id)s
), writers AS MATERIALIZED (
    SELECT l.transactionid, l.pid, a.application_name, a.state, coalesce(a.xact_start, x.prepared) AS since, x.gid,
           EXISTS (SELECT FROM pg_locks AS w
                   WHERE w.virtualtransaction = l.virtualtransaction
                     AND w.locktype = 'relation'
                     AND w.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                     AND w.relation = 'outbox_events'::regclass
                     AND w.mode = 'RowExclusiveLock') AS wrote_outbox
    FROM pg_locks AS l
    LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
    LEFT JOIN pg_prepared_xacts AS x ON x.transaction = l.transactionid
    WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted
)
SELECT i.variant_id, outbox_partition_of(coalesce(s.job_id, v.job_id)) AS partition,
       v.job_id AS row_job_id, v.status::text AS row_status, v.current_step::text AS row_step,
       s.job_id AS state_job_id, s.version AS state_version, s.status AS state_status, s.step AS state_step,
       s.removed AS state_removed, s.problem AS state_problem, s.event_id AS state_event_id,
       b.job_id AS baseline_job_id, b.version AS baseline_version, b.status AS baseline_status,
       b.step AS baseline_step, b.removed AS baseline_removed, b.event_id AS baseline_event_id,
       (SELECT count(*) FROM outbox_events AS e WHERE e.variant_id = i.variant_id) AS events_total,
       (SELECT count(*) FROM outbox_events AS e
        WHERE e.variant_id = i.variant_id
          AND EXISTS (SELECT FROM outbox_events_pending(e.partition) AS p WHERE p.event_id = e.event_id))
           AS events_pending,
       w.pid AS writer_pid, w.application_name AS writer_application_name, w.state AS writer_state,
       w.since AS writer_since, w.transactionid::text AS writer_xid, w.gid AS writer_prepared_gid,
       w.wrote_outbox AS writer_wrote_outbox
FROM ids AS i
LEFT JOIN jobs_variants AS v ON v.job_variants_id = i.variant_id
LEFT JOIN outbox_variant_states AS s ON s.variant_id = i.variant_id
LEFT JOIN outbox_variant_baseline AS b ON b.variant_id = i.variant_id
LEFT JOIN writers AS w ON w.transactionid = v.xmax
ORDER BY i.variant_id

-- name: variant_events_recent
-- The newest events of each variant (a top-N of its variant_id index entries), each read as the
-- drain reads it (outbox_event_decode) and judged by its partition's checkpoint with the product's
-- own rules: applied (outbox_event_applied, as replay judges it) and pending (outbox_events_pending:
-- its effect is not in job state yet). Every row here is committed: an event whose transaction is
-- still open is invisible to this statement (job_variants_inspect tells who holds it).
WITH issued AS MATERIALIZED (
    SELECT outbox_versions_issued() AS versions
)
SELECT x.*
FROM unnest(%(variant_ids)s::uuid[]) AS v (variant_id)
CROSS JOIN LATERAL (
    SELECT e.variant_id, e.event_id, e.txid::text AS txid, e.partition, e.job_id, e.event_type,
           e.variant_version AS version, e.created_at, d.status, d.step, d.readable,
           outbox_event_applied(e.txid, e.event_id, c.done_snapshot, c.target_snapshot, c.last_txid,
                                c.last_event_id) AS applied,
           EXISTS (SELECT FROM outbox_events_pending(e.partition) AS p WHERE p.event_id = e.event_id) AS pending,
           dl.reason AS dead_letter_reason, dl.holds_job AS dead_letter_holds_job,
           dl.discarded_at AS dead_letter_discarded_at
    FROM (SELECT * FROM outbox_events AS o
          WHERE o.variant_id = v.variant_id
          ORDER BY o.event_id DESC
          LIMIT %(limit)s) AS e
    LEFT JOIN outbox_checkpoints AS c ON c.partition = e.partition
    LEFT JOIN outbox_dead_letters AS dl ON dl.event_id = e.event_id
    CROSS JOIN issued AS i
    CROSS JOIN LATERAL outbox_event_decode(
        e.event_type, e.schema_version, e.job_id, e.variant_id, e.variant_version, e.payload, i.versions) AS d
) AS x
ORDER BY x.variant_id, x.event_id DESC

-- name: job_dead_letters_list
-- The job's dead letters, newest first, discarded ones too (with their event, unless pruned).
SELECT d.event_id, d.variant_id, d.reason, d.holds_job, d.parked_at, d.discarded_at, e.event_type,
       e.created_at
FROM outbox_dead_letters AS d
LEFT JOIN outbox_events AS e USING (event_id)
WHERE d.job_id = %(job_id)s
ORDER BY d.event_id DESC
LIMIT %(limit)s

-- name: job_transitions_recent
-- The job's newest transitions, newest first.
SELECT transition_id, job_id, partition, from_status, from_step, to_status, to_step, written_by, transitioned_at
FROM outbox_job_transitions
WHERE job_id = %(job_id)s
ORDER BY transition_id DESC
LIMIT %(limit)s
