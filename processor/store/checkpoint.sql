-- Each partition's checkpoint (outbox_checkpoints): how far it is applied (processor.snapshot.Cursor:
-- the done snapshot, the catch-up's target and the last event applied within it), read, locked and
-- moved. processor/store/checkpoint.py runs these.

-- name: checkpoint_get
SELECT done_snapshot::text AS done, target_snapshot::text AS target, last_txid::text AS after_txid,
       last_event_id AS after_event_id, events_applied, updated_at, fold_config_version
FROM outbox_checkpoints
WHERE partition = %(partition)s

-- name: checkpoint_lock
-- FOR UPDATE serialises every transaction that moves this partition's checkpoint: a second
-- consumer (a zombie, or one that got past the advisory lock through a pooler) waits here, then
-- sees the moved checkpoint and applies nothing (processor.batch.FencedError). The row as locked
-- (after any wait) also says which fold configuration the partition folds with now.
SELECT partition, done_snapshot::text AS done, target_snapshot::text AS target, last_txid::text AS after_txid,
       last_event_id AS after_event_id, fold_config_version
FROM outbox_checkpoints
WHERE partition = %(partition)s
FOR UPDATE

-- name: checkpoints_lock_all
-- Every partition's checkpoint, locked in partition order: what an operation holds while it
-- changes variant or job state of any partition (replay, repair, dead letters, a pipeline change).
-- Workers wait for it between two batches, `outbox repartition` waits for it before it switches
-- (it locks them in the same order), and it waits for them: none of them runs while it does.
SELECT partition, done_snapshot::text AS done, target_snapshot::text AS target, last_txid::text AS after_txid,
       last_event_id AS after_event_id, fold_config_version
FROM outbox_checkpoints
ORDER BY partition
FOR UPDATE

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
