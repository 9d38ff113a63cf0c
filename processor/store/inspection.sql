-- What the inspection commands read (processor/store/inspection.py): `outbox backlog`, `outbox check`,
-- `outbox verify` (and the one event its --repair writes) and `outbox explain`. Each read sees one
-- snapshot (store.one_snapshot) and decides nothing the product's own functions decide: pending is
-- outbox_events_pending, applied is outbox_event_applied_v1, a variant's newest state is what
-- outbox_variant_states keeps.

-- `outbox backlog`.

-- name: backlog_counts_get
-- One partition's counts for `outbox backlog`: dead letters and flags (of every partition), its jobs
-- awaiting fold, the outbox's size (its segments' sizes and statistics: a partitioned table has
-- none of its own), its throughput over the last minute and its last applied event.
SELECT (SELECT count(*) FROM outbox_dead_letters WHERE discarded_at IS NULL) AS dead_letters,
       (SELECT count(*) FROM outbox_job_flags) AS flagged_jobs,
       (SELECT count(*) FROM outbox_dirty_jobs WHERE partition = %(partition)s) AS jobs_awaiting_fold,
       (SELECT coalesce(sum(pg_total_relation_size(t.relid)), 0)::bigint
        FROM pg_partition_tree('outbox_events') AS t WHERE t.isleaf) AS outbox_bytes,
       (SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint
        FROM pg_partition_tree('outbox_events') AS t JOIN pg_class AS c ON c.oid = t.relid
        WHERE t.isleaf) AS outbox_rows_estimate,
       (SELECT coalesce(sum(events), 0)
        FROM outbox_throughput
        WHERE partition = %(partition)s AND bucket > clock_timestamp() - interval '70 seconds'
          AND bucket <= clock_timestamp() - interval '10 seconds') / 60.0 AS events_per_second,
       (SELECT last_applied_event_id FROM outbox_checkpoints WHERE partition = %(partition)s) AS last_event_id,
       (SELECT last_applied_at FROM outbox_checkpoints WHERE partition = %(partition)s) AS applied_at

-- name: worker_sessions_list
-- Every connected worker of this database, from its application_name (processor.worker).
SELECT pid, application_name, backend_start, state, clock_timestamp() - state_change AS in_state_for
FROM pg_stat_activity
WHERE datname = current_database()
  AND application_name LIKE 'outbox-worker:%%'
ORDER BY backend_start

-- `outbox check`.

-- name: health_counts_get
-- `outbox check`: flagged jobs, dead letters waiting for retry or discard, and the database's clock.
SELECT (SELECT count(*) FROM outbox_job_flags) AS flagged_jobs,
       (SELECT count(*) FROM outbox_dead_letters WHERE discarded_at IS NULL) AS dead_letters,
       clock_timestamp() AS now

-- `outbox verify`: in one REPEATABLE READ snapshot, in flight left out (processor/verify.py).

-- name: in_flight_get
-- Work in flight (pending: outbox_events_pending and outbox_dirty_jobs) is not drift: its jobs and
-- variants are left out of the comparison.
SELECT ARRAY(SELECT job_id FROM outbox_events_pending(NULL) WHERE job_id IS NOT NULL
             UNION SELECT job_id FROM outbox_dirty_jobs) AS job_ids,
       ARRAY(SELECT DISTINCT variant_id FROM outbox_events_pending(NULL) WHERE variant_id IS NOT NULL) AS variant_ids

-- name: variant_drift_list
-- Variants whose row in jobs_variants and whose event-derived state disagree (in flight left out),
-- and stored states at a version capture never issued (only a hand-written event could put one
-- there).
WITH states AS (
    SELECT * FROM outbox_variant_states WHERE NOT removed
)
SELECT coalesce(v.job_variants_id, s.variant_id) AS variant_id,
       v.job_id AS row_job_id, v.status::text AS row_status, v.current_step::text AS row_step,
       s.job_id AS state_job_id, s.status AS state_status, s.step AS state_step
FROM jobs_variants AS v
FULL JOIN states AS s ON s.variant_id = v.job_variants_id
WHERE (v.job_variants_id IS NULL OR s.variant_id IS NULL
       OR (v.job_id, v.status::text, v.current_step::text) IS DISTINCT FROM (s.job_id, s.status, s.step)
       OR s.version > (SELECT outbox_versions_issued_v1()))
  AND coalesce(v.job_variants_id, s.variant_id) <> ALL(%(in_flight_variants)s::uuid[])
  AND coalesce(v.job_id, s.job_id) IS NOT NULL
  AND (%(partition)s::integer IS NULL OR outbox_partition_of(coalesce(v.job_id, s.job_id)) = %(partition)s)
ORDER BY 1
LIMIT %(limit)s

-- name: stuck_jobs_list
-- The original symptom: every variant is done at the final step, yet the job is not done.
SELECT j.job_id, j.status::text AS status, j.current_step::text AS current_step
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

-- name: job_ids_with_state_after
SELECT DISTINCT job_id
FROM outbox_variant_states
WHERE job_id > %(after)s AND (%(partition)s::integer IS NULL OR outbox_partition_of(job_id) = %(partition)s)
ORDER BY job_id
LIMIT %(limit)s

-- name: job_flags_list
-- Flagged jobs with their reasons, and the dead letters that hold them (0009).
SELECT f.job_id, f.reason, f.flagged_at,
       ARRAY(SELECT d.event_id FROM outbox_dead_letters AS d
             WHERE d.job_id = f.job_id AND d.discarded_at IS NULL ORDER BY d.event_id) AS dead_letters
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
-- drain reads it (outbox_event_decode_v1) and judged by its partition's checkpoint with the product's
-- own rules: applied (outbox_event_applied_v1, as replay judges it) and pending (outbox_events_pending:
-- its effect is not in job state yet). Every row here is committed: an event whose transaction is
-- still open is invisible to this statement (job_variants_inspect tells who holds it).
WITH issued AS MATERIALIZED (
    SELECT outbox_versions_issued_v1() AS versions
)
SELECT x.*
FROM unnest(%(variant_ids)s::uuid[]) AS v (variant_id)
CROSS JOIN LATERAL (
    SELECT e.variant_id, e.event_id, e.txid::text AS txid, e.partition, e.job_id, e.event_type,
           e.variant_version AS version, e.created_at, d.status, d.step, d.readable,
           outbox_event_applied_v1(e.txid, e.event_id, c.done_snapshot, c.target_snapshot, c.last_txid,
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
    CROSS JOIN LATERAL outbox_event_decode_v1(
        e.event_type, e.schema_version, e.job_id, e.variant_id, e.variant_version, e.payload, i.versions) AS d
) AS x
ORDER BY x.variant_id, x.event_id DESC
