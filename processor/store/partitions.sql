-- Partitions and the advisory locks that share them out (processor/store/partitions.py, which holds the
-- lock classes and keys): the consumers' and members' locks, the elected worker's, the partition count,
-- `outbox repartition`, the rebase after a restore, and the wake-up by NOTIFY.

-- Consumers: one session per partition (processor/worker.py, processor/partition.py).

-- name: consumer_lock_try
-- Session-level: held by the connection that writes, released when it closes or dies.
SELECT pg_try_advisory_lock(%(lock_class)s, %(partition)s) AS taken

-- name: consumer_lock_release
SELECT pg_advisory_unlock(%(lock_class)s, %(partition)s)

-- name: consumer_lock_holder
SELECT a.pid, a.application_name, a.backend_start AS since
FROM pg_locks AS l
JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory'
  AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %(lock_class)s::int::oid
  AND l.objid = %(partition)s::int::oid
  AND l.objsubid = 2

-- name: consumer_locks_holders
-- Each partition's consumer, if any: for `outbox backlog` and the standby log.
SELECT l.objid::int AS partition, a.pid, a.application_name, a.backend_start AS since
FROM pg_locks AS l
JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory'
  AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %(lock_class)s::int::oid
  AND l.objsubid = 2
  AND l.objid::int >= 0  -- not migrate's, repartition's or the transitions' (keys below 0)
ORDER BY 1

-- Members: every live worker session, for the fair share.

-- name: members_join
-- Every worker session holds this lock in shared mode: the number of holders is the number of
-- live workers, which each uses to take its fair share of the partitions. It goes with the session.
SELECT pg_advisory_lock_shared(%(lock_class)s, 0)

-- name: members_count
SELECT count(*) AS members
FROM pg_locks
WHERE locktype = 'advisory'
  AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid = %(lock_class)s::int::oid
  AND objid = 0
  AND objsubid = 2

-- name: election_lock_try
-- Cluster-wide periodic work (processor/election.py): the session that holds a duty's key does it. Session-
-- level: it goes with the connection, and another worker takes it at its next try. Taken twice, it stacks:
-- the caller tries once per session.
SELECT pg_try_advisory_lock(%(lock_class)s, %(duty)s) AS taken

-- name: partitions_get
SELECT partitions FROM outbox_partitioning

-- The rebase after a restore into another cluster (processor/rebase.py).

-- name: cluster_check
-- The checkpoint's cluster, this cluster, and whether a rebuild is still pending. A checkpoint with
-- no cluster yet (first run) is claimed for this one.
WITH claimed AS (
    UPDATE outbox_checkpoints SET cluster_id = (SELECT system_identifier FROM pg_control_system())
    WHERE partition = %(partition)s AND cluster_id IS NULL
    RETURNING cluster_id
)
SELECT coalesce((SELECT cluster_id FROM claimed), c.cluster_id) AS checkpoint_cluster,
       (SELECT system_identifier FROM pg_control_system()) AS this_cluster,
       c.rebase_pending
FROM outbox_checkpoints AS c
WHERE c.partition = %(partition)s

-- name: snapshot_current
-- Read after cluster_check, in a statement of its own (a snapshot taken after that statement's writes).
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

-- `outbox repartition` (processor/repartition.py).

-- name: repartition_serialise
-- One repartition at a time (transaction-level).
SELECT pg_advisory_xact_lock(%(lock_class)s, %(key)s)

-- name: transaction_lock_timeout
SELECT set_config('lock_timeout', %(lock_timeout)s, true)

-- name: transaction_statement_timeout
SELECT set_config('statement_timeout', %(statement_timeout)s, true)

-- name: repartition_hold_writers
-- SHARE blocks every INSERT into the outbox (and waits for the transactions that already wrote
-- events to end), while the workers keep reading and applying: once they have applied everything,
-- nothing new can arrive until the count has changed.
LOCK TABLE outbox_events IN SHARE MODE

-- name: repartition_catch_ups_count
-- What keeps the outbox from being drained besides events not applied yet (events_pending_summary counts
-- those, and the jobs waiting to be folded): catch-ups in progress.
SELECT count(*) AS catch_ups FROM outbox_checkpoints WHERE target_snapshot IS NOT NULL

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

-- name: repartition_relabel_jobs_awaiting_fold
-- Jobs waiting to be folded go with their job's new partition (the outbox is drained, so there are
-- normally none; one queued by a worker of a partition being removed is not left behind).
WITH moved AS (
    DELETE FROM outbox_dirty_jobs WHERE partition <> outbox_partition_of(job_id) RETURNING job_id, queued_at
)
INSERT INTO outbox_dirty_jobs (partition, job_id, queued_at)
SELECT outbox_partition_of(job_id), job_id, min(queued_at) FROM moved GROUP BY job_id
ON CONFLICT (partition, job_id) DO NOTHING

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

-- Wake-up by NOTIFY (OUTBOX_WAKEUP=notify; processor/wakeup.py, schema/migrations/0003_notify_wakeup.sql).

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
) AS enabled

-- name: wakeup_enable
SELECT outbox_wakeup_enable()

-- name: wakeup_disable
SELECT outbox_wakeup_disable()
