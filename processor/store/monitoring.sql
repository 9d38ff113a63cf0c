-- What the elected worker scans for the gauges of pending work (processor/metrics.py), and the other
-- cluster-wide upkeep it does (processor/election.py): processor/store/monitoring.py runs these.

-- name: dead_letters_count_by_class
-- Dead letters waiting for retry or discard, by the class of their reason: processor.decode's
-- DeadLetterClass (the classification's one owner) passes each class with the prefix its reasons
-- begin with, in order; the last, 'other', has the empty prefix.
SELECT c.class AS reason_class, count(*) AS dead_letters
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
SELECT count(*) AS flagged FROM outbox_job_flags

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
SELECT l.transactionid::text AS xid,
       extract(epoch FROM clock_timestamp() - coalesce(a.xact_start, x.prepared))::float8 AS seconds_open
FROM locks AS l
JOIN writers AS w USING (virtualtransaction)
LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
LEFT JOIN pg_prepared_xacts AS x ON x.transaction = l.transactionid
WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted
  AND l.pid IS DISTINCT FROM pg_backend_pid()

-- name: throughput_prune
-- The counts `outbox backlog` reads its throughput from (outbox_throughput): a day is kept.
DELETE FROM outbox_throughput WHERE bucket < clock_timestamp() - interval '1 day'
