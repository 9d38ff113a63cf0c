-- Job state (the application's jobs table, which the processor alone writes, through jobs_write),
-- its transitions, holds and row locks, and the jobs awaiting fold: outbox_dirty_jobs (the table's
-- name is kept for running workers) queues the jobs whose state is to be folded later: after a
-- catch-up closes, when their row was locked, or at start-up for flagged jobs. To fold a job is to
-- compute its state from its variants' (processor.fold) and write it (jobs_write).
-- processor/store/jobs.py runs these.

-- name: jobs_write
-- Writing job state: the one statement that does it, for the worker's batches and every
-- operation alike. Jobs of a partition that is catching up (catching_up_partitions) await their fold
-- in outbox_dirty_jobs until the catch-up closes: a job shows only states of complete snapshots. A
-- job row that another transaction holds locked is not waited for (SKIP LOCKED): the job goes to
-- outbox_dirty_jobs, to be folded again a second later, and the rest go on. Flags of the jobs
-- folded are cleared, or set with the reason. Held jobs are left alone. The columns' own types
-- are written through their cast functions. Returns what was written (with each job's state
-- before and after: its transition, which transitions_append writes), left awaiting fold and
-- blocked.
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
), awaiting_fold AS MATERIALIZED (
    SELECT DISTINCT job_id
    FROM unnest(%(folded_job_ids)b::uuid[] || %(flag_job_ids)b::uuid[]) AS t (job_id)
    WHERE cardinality(%(catching_up_partitions)b::integer[]) > 0
      AND outbox_partition_of(job_id) = ANY(%(catching_up_partitions)b::integer[])
), changing AS MATERIALIZED (
    -- Only the rows whose state differs are written, and locked. The row's version as this
    -- statement's snapshot saw it (xmin) is kept for the lock below.
    SELECT i.*, j.xmin AS seen_xmin, j.status::text AS from_status, j.current_step::text AS from_step
    FROM incoming AS i
    JOIN jobs AS j USING (job_id)
    WHERE (j.status::text, j.current_step::text) IS DISTINCT FROM (i.status, i.current_step)
      AND NOT EXISTS (SELECT FROM awaiting_fold AS d WHERE d.job_id = i.job_id)
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
    SELECT outbox_partition_of(job_id), job_id, NULL FROM awaiting_fold
    UNION ALL
    SELECT outbox_partition_of(job_id), job_id, clock_timestamp() + interval '1 second' FROM blocked
    ON CONFLICT (partition, job_id) DO UPDATE SET retry_at = excluded.retry_at
), flags_cleared AS (
    DELETE FROM outbox_job_flags AS f
    WHERE f.job_id = ANY(%(folded_job_ids)b::uuid[])
      AND NOT EXISTS (SELECT FROM awaiting_fold AS d WHERE d.job_id = f.job_id)
), flags_set AS (
    INSERT INTO outbox_job_flags AS f (job_id, reason)
    SELECT t.job_id, t.reason
    FROM unnest(%(flag_job_ids)b::uuid[], %(flag_reasons)b::text[]) AS t (job_id, reason)
    WHERE NOT EXISTS (SELECT FROM awaiting_fold AS d WHERE d.job_id = t.job_id)
    ON CONFLICT (job_id) DO UPDATE SET reason = excluded.reason, flagged_at = now()
        WHERE f.reason <> excluded.reason
)
SELECT (SELECT count(*) FROM updated) AS jobs_changed, (SELECT count(*) FROM awaiting_fold) AS jobs_awaiting_fold,
       ARRAY(SELECT job_id FROM blocked ORDER BY 1) AS jobs_blocked,
       -- The transitions (transitions_append writes them, last thing before the commit).
       ARRAY(SELECT job_id FROM updated ORDER BY job_id) AS job_ids,
       ARRAY(SELECT from_status FROM updated ORDER BY job_id) AS from_statuses,
       ARRAY(SELECT from_step FROM updated ORDER BY job_id) AS from_steps,
       ARRAY(SELECT to_status FROM updated ORDER BY job_id) AS to_statuses,
       ARRAY(SELECT to_step FROM updated ORDER BY job_id) AS to_steps

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
    SELECT outbox_transitions_publish_v1() AS count
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
SELECT (SELECT count(*) FROM appended) AS appended, (SELECT sum(count) FROM published) AS published,
       (SELECT pg_notify('outbox_transitions', '')
        WHERE EXISTS (SELECT FROM appended) OR (SELECT sum(count) FROM published) > 0) IS NULL AS notified

-- name: jobs_lock_holders
-- Who holds each job row locked: the transaction in the row's xmax (a row lock, or an update not
-- yet committed) and its backend. A lock shared by several transactions (a multixact) shows no
-- backend.
SELECT j.job_id, a.pid, a.application_name, a.state, a.xact_start AS since
FROM jobs AS j
LEFT JOIN pg_locks AS l
       ON l.locktype = 'transactionid' AND l.transactionid = j.xmax AND l.mode = 'ExclusiveLock' AND l.granted
LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE j.job_id = ANY(%(job_ids)s::uuid[])
ORDER BY j.job_id

-- name: job_holds_list
-- Held jobs (0010): their state is the application's, not the fold of their variants.
SELECT job_id, status, current_step, reason, held_at
FROM outbox_job_holds
WHERE %(job_ids)s::uuid[] IS NULL OR job_id = ANY(%(job_ids)s::uuid[])
ORDER BY job_id

-- name: jobs_awaiting_fold_add
INSERT INTO outbox_dirty_jobs (partition, job_id)
SELECT %(partition)s, unnest(%(job_ids)s::uuid[])
ON CONFLICT DO NOTHING

-- name: jobs_awaiting_fold_add_applied
-- The jobs of every event a catch-up applied, when it completes (its jobs awaited their fold until
-- then): the range read (events.sql) of the cursor from the old done snapshot to the new one
-- (Cursor.closing), without a limit. Each awaits since its oldest such event.
WITH target AS MATERIALIZED (
    SELECT %(target)s::pg_snapshot AS snapshot
)
INSERT INTO outbox_dirty_jobs AS d (partition, job_id, queued_at)
SELECT %(partition)s, e.job_id, min(e.created_at)
FROM (
    SELECT job_id, created_at
    FROM outbox_events
    WHERE {{events.sql:events_after_range_start}}
    UNION ALL
    SELECT o.job_id, o.created_at
    FROM {{events.sql:done_xip_committed}}
    JOIN outbox_events AS o ON o.partition = %(partition)s AND o.txid = xip.txid
) AS e
WHERE e.job_id IS NOT NULL
GROUP BY e.job_id
ON CONFLICT (partition, job_id) DO UPDATE SET queued_at = least(d.queued_at, excluded.queued_at), retry_at = NULL

-- name: jobs_awaiting_fold_exist
SELECT EXISTS (SELECT 1 FROM outbox_dirty_jobs WHERE partition = %(partition)s)

-- name: jobs_awaiting_fold_add_flagged
-- At start-up, flagged jobs are folded again: the pipeline setting may have been fixed.
INSERT INTO outbox_dirty_jobs (partition, job_id)
SELECT %(partition)s, job_id
FROM outbox_job_flags
WHERE outbox_partition_of(job_id) = %(partition)s
ON CONFLICT DO NOTHING

-- name: jobs_awaiting_fold_take
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
SELECT ARRAY(SELECT job_id FROM taken) AS job_ids,
       (SELECT extract(epoch FROM min(retry_at) - clock_timestamp())::float8
        FROM outbox_dirty_jobs WHERE partition = %(partition)s AND retry_at > clock_timestamp()) AS next_retry_in

-- Jobs as operations pick them (replay, verify, dead letters, prune, a pipeline change). Each
-- operation changes state in transactions that first lock checkpoint rows (every partition's,
-- checkpoints_lock_all; prune only its partition's), so it sees exactly what the workers have applied
-- and they wait for it: nothing is applied twice or missed around them, and `outbox repartition`
-- waits for them as they wait for it.

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

-- name: jobs_get
SELECT job_id, status::text, current_step::text FROM jobs WHERE job_id = ANY(%(job_ids)s::uuid[])

-- name: jobs_in_partition
SELECT job_id
FROM unnest(%(job_ids)s::uuid[]) AS t (job_id)
WHERE outbox_partition_of(job_id) = %(partition)s
ORDER BY job_id
