-- The outbox's events (outbox_events) as the drain reads them: after a partition's cursor
-- (processor.snapshot.Cursor), applied to the variant states in one statement per batch.
-- processor/store/events.py runs these.

-- The range read: which events come after a cursor. Every statement that reads events after a
-- cursor is made of these two fragments (outbox.sqlfile splices them in), so the rule is written
-- once. An event is not applied yet when its transaction is not visible in the done snapshot: its
-- txid is at or above the done snapshot's xmax, or in its xip list (running when it was taken).
-- Among those, the range read takes the ones visible in the target snapshot (a CTE `target`
-- (snapshot) of the statement that includes them), each half from the index
-- outbox_events_position_idx (partition, txid, event_id). A transaction still running is in
-- neither half, and stays in the next target's xip list until it ends: a late commit is picked
-- up, not skipped. Parameters: Cursor.params().

-- fragment: events_after_range_start
-- The first half, as a condition on outbox_events (unqualified: the only relation in scope): the
-- partition's events from the cursor's range start (Cursor.range_start: the done snapshot's xmax,
-- or after the last event applied within a catch-up) whose transaction the target sees committed.
-- One index range, bounded above by the target's xmax.
partition = %(partition)s
           AND (txid, event_id) > (%(range_txid)s::xid8, %(range_event_id)s::bigint)
           AND txid < (SELECT pg_snapshot_xmax(snapshot) FROM target)
           AND pg_visible_in_snapshot(txid, (SELECT snapshot FROM target))

-- fragment: done_xip_committed
-- The second half, as a FROM item `xip (txid)`: the transactions running at the done snapshot
-- that the target sees committed. Each is joined to its events by the index (partition, txid).
(SELECT xip.txid
          FROM unnest(%(done_xip)s::xid8[]) AS xip (txid)
          WHERE pg_visible_in_snapshot(xip.txid, (SELECT snapshot FROM target))) AS xip

-- name: events_probe
-- Whether any event is ready after the cursor (the worker's cheap check before it opens a batch
-- transaction): the range read, with this statement's snapshot as target.
WITH target AS MATERIALIZED (
    SELECT pg_current_snapshot() AS snapshot
)
SELECT EXISTS (
           SELECT 1
           FROM outbox_events
           WHERE {{events_after_range_start}}
       )
    OR EXISTS (
           SELECT 1
           FROM {{done_xip_committed}}
           JOIN outbox_events AS o ON o.partition = %(partition)s AND o.txid = xip.txid
       )

-- name: events_apply_in_order
-- Set for events_apply only (events_apply_done restores what was there before): its range read
-- must come in (txid, event_id) order from each segment's position index, merged (Merge Append),
-- never by sorting every event after the cursor (Append, then a top-N Sort). The planner picks the
-- sort when it believes few events follow the cursor: its estimate of a row comparison uses the
-- first column only, so a cursor inside one large transaction, or statistics older than the backlog,
-- look like almost nothing left; the half that reads a transaction of the done snapshot's xip list
-- is always estimated at the average transaction's size. Read that way, each batch of a catch-up
-- sorted what remained: a 1M-event drain ran at 0.75 of its rate, and each batch cost more the
-- longer the backlog (bench/README.md, "Where a drain's time goes"). Unsorted, merging the
-- segments' index scans is the only plan left. JIT off with it: a disabled sort still costs its
-- penalty where no other plan exists (the DISTINCT ONs), which puts the estimate past
-- jit_above_cost, and compiling the statement took about 0.9 s a batch.
-- Returns the values in force before (a MATERIALIZED CTE is read before the row's set_config
-- calls run), named as events_apply_done's parameters; set_config(..., true) is SET LOCAL: the end
-- of the transaction, or its rollback, restores them too.
WITH before AS MATERIALIZED (
    SELECT current_setting('enable_sort') AS enable_sort, current_setting('jit') AS jit
)
SELECT b.enable_sort, b.jit,
       set_config('enable_sort', 'off', true) AS sort_off, set_config('jit', 'off', true) AS jit_off
FROM before AS b

-- name: events_apply_done
-- Back to the values events_apply_in_order found (a session's own SET included, which
-- SET LOCAL ... TO DEFAULT would not give back), for the rest of the batch's transaction.
SELECT set_config('enable_sort', %(enable_sort)s, true), set_config('jit', %(jit)s, true)

-- name: events_apply
-- Reads the next events after the cursor and applies the readable ones to the variant states, in
-- one statement (one round trip, and no per-event work in Python): the heart of the drain.
--
-- Which events: the range read (above), with the target snapshot given (this statement's own
-- snapshot when none is), in (txid, event_id) order, up to the limit.
--
-- Readable events (outbox_event_decode_v1) are merged into the variant states (the newest of each
-- variant wins: outbox_variant_states_merge_v1). Anything else is left to processor.decode, by event
-- id, to become a problem state and a dead letter.
--
-- Returns the target snapshot, the events read (ids and write times, in order), the position of
-- the last one, the unreadable ones, and the jobs to fold again: those of the variants whose state
-- moved forward, and the jobs such variants moved away from. Last, the trace context (migration
-- 0013) of each job's last event in the batch that carries one: the batch span links to them, and
-- the job's transition carries it (NULL arrays when no event of the batch has one).
WITH target AS MATERIALIZED (
    SELECT coalesce(%(target)s::pg_snapshot, pg_current_snapshot()) AS snapshot
), issued AS MATERIALIZED (
    SELECT outbox_versions_issued_v1() AS versions
), batch AS MATERIALIZED (
    SELECT e.*
    FROM (
        (SELECT *
         FROM outbox_events
         WHERE {{events_after_range_start}}
         ORDER BY txid, event_id
         LIMIT %(limit)s)
        UNION ALL
        -- One index read per transaction that was running at the done snapshot and is visible now,
        -- each in event order (txid = ANY(...) on the index would read them all and sort).
        (SELECT x.*
         FROM {{done_xip_committed}}
         CROSS JOIN LATERAL (
             SELECT *
             FROM outbox_events AS o
             WHERE o.partition = %(partition)s
               AND o.txid = xip.txid
               AND (o.txid, o.event_id) > (%(after_txid)s::xid8, %(after_event_id)s::bigint)
             ORDER BY o.event_id
             LIMIT %(limit)s
         ) AS x
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
    CROSS JOIN LATERAL outbox_event_decode_v1(
        b.event_type, b.schema_version, b.job_id, b.variant_id, b.variant_version, b.payload, i.versions) AS d
), upserted AS MATERIALIZED (  -- evaluated exactly once: it writes
    SELECT merged_job_id AS job_id, merged_moved_from AS moved_from
    FROM outbox_variant_states_merge_v1(ARRAY(
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
    -- The job's last event in the batch, in (txid, event_id) order: the order events are
    -- applied in, not a variant's version order (which outbox_variant_states_newest owns).
    SELECT DISTINCT ON (job_id) job_id, trace_parent
    FROM decoded
    WHERE trace_parent IS NOT NULL AND job_id IS NOT NULL
    ORDER BY job_id, txid DESC, event_id DESC
)
SELECT (SELECT snapshot::text FROM target) AS target,
       s.events AS count, s.event_ids, s.created_at, s.last_txid, s.readable, s.unreadable,
       (SELECT array_agg(DISTINCT job_id)
        FROM (SELECT job_id FROM upserted
              UNION ALL
              SELECT moved_from FROM moved
              UNION ALL
              -- A removal can arrive after the variant's state moved on (its move to a job of
              -- another partition was applied first): its job is folded again all the same.
              SELECT job_id FROM decoded WHERE readable AND removed) AS t) AS jobs,
       (SELECT array_agg(DISTINCT moved_from) FROM moved) AS moved_from,
       (SELECT array_agg(job_id) FROM traced) AS traced_job_ids,
       (SELECT array_agg(trace_parent) FROM traced) AS trace_parents
FROM summary AS s

-- name: events_get
-- Events by id, in order, for processor.decode (the ones events_apply left to it), with whether
-- each one's version is one capture issued.
SELECT event_id, txid::text::bigint AS txid, event_type, schema_version, job_id, variant_id, variant_version,
       outbox_event_payload(payload) AS payload, created_at,
       variant_version BETWEEN 1 AND (SELECT outbox_versions_issued_v1()) AS version_issued
FROM outbox_events
WHERE event_id = ANY(%(event_ids)s::bigint[])
ORDER BY txid, event_id

-- name: events_pending_summary
-- Pending work (outbox_events_pending: events whose effect is not in job state yet; and the jobs
-- awaiting fold in outbox_dirty_jobs) of one partition, or of all (NULL). Exact; reads every event
-- above each done snapshot's xmin.
WITH pending AS MATERIALIZED (
    SELECT event_type, job_id, created_at FROM outbox_events_pending(%(partition)s)
), waiting AS MATERIALIZED (
    SELECT job_id, queued_at FROM outbox_dirty_jobs WHERE %(partition)s::integer IS NULL OR partition = %(partition)s
)
SELECT (SELECT count(*) FROM pending) AS count,
       (SELECT extract(epoch FROM clock_timestamp() - least(
            (SELECT min(created_at) FROM pending), (SELECT min(queued_at) FROM waiting)))::float8) AS oldest_age_seconds,
       (SELECT coalesce(jsonb_object_agg(event_type, n), '{}'::jsonb)
        FROM (SELECT event_type, count(*) AS n FROM pending GROUP BY event_type) AS t) AS by_event_type,
       (SELECT coalesce(jsonb_agg(jsonb_build_object('job_id', job_id, 'pending_events', n) ORDER BY n DESC),
                        '[]'::jsonb)
        FROM (SELECT job_id, count(*) AS n FROM pending GROUP BY job_id ORDER BY n DESC LIMIT %(top)s) AS t) AS top_jobs,
       (SELECT count(*) FROM waiting) AS jobs_awaiting_fold
