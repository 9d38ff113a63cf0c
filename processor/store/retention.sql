-- What retention runs (processor/retention.py): segments rotated, closed segments of events folded
-- into the baseline and truncated, closed segments of transitions truncated (the rules of what may
-- go are in the schema's truncate functions: schema/schema.sql, "Segments"), fresh statistics.

-- name: cutoff_get
-- The database's clock minus a duration: what `outbox prune --older-than` removes is older than this.
SELECT clock_timestamp() - %(interval)s::interval

-- name: segments_due
-- The segmented tables whose current segment should close: it holds a row, and it has been open
-- for at least %(every)s.
SELECT s.relation
FROM outbox_segments AS s
WHERE s.opened_at IS NOT NULL AND s.closed_at IS NULL
  AND s.opened_at <= clock_timestamp() - %(every)s::interval
  AND CASE s.relation
        WHEN 'outbox_events' THEN EXISTS (SELECT FROM outbox_events WHERE segment = s.segment)
        ELSE EXISTS (SELECT FROM outbox_job_transitions WHERE segment = s.segment)
      END
ORDER BY s.relation

-- name: segments_rotate
SELECT outbox_segments_rotate(%(relation)s) AS segment

-- name: segments_closed
-- A table's closed segments, oldest first.
SELECT segment FROM outbox_segments
WHERE relation = %(relation)s AND closed_at IS NOT NULL
ORDER BY closed_at, segment

-- name: segment_holder
-- Another session that holds a lock on a segment in a transaction open for %(held_for)s or more
-- (one that read the outbox and stays idle in its transaction): retention leaves the segment to
-- its next round rather than fold it for nothing and wait for it with every checkpoint held.
SELECT a.pid, a.application_name, a.state, clock_timestamp() - a.xact_start AS in_transaction_for
FROM pg_locks AS l
JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.granted
  AND l.relation = to_regclass(format('%%s_s%%s', %(relation)s::text, %(segment)s::int))
  AND l.pid <> pg_backend_pid()
  AND a.xact_start <= clock_timestamp() - %(held_for)s::interval
ORDER BY a.xact_start
LIMIT 1

-- name: lock_timeout_local
-- For the rest of the transaction: a lock not granted within this time fails the statement.
SELECT set_config('lock_timeout', %(timeout)s, true)

-- name: events_segment_survey
-- Whether a closed segment's events may all go (the truncate function checks again under its
-- lock): how many, how many are not applied (not visible in their partition's done snapshot), how
-- many are of a partition with no checkpoint (never applied: an event with no job that kept the
-- partition it had before `outbox repartition` lowered the count), how many are younger than the
-- cutoff, how many wait as dead letters; and the snapshot this statement read them in, which the
-- fold reads them in too.
SELECT count(*) AS events,
       count(*) FILTER (WHERE c.partition IS NOT NULL AND NOT pg_visible_in_snapshot(e.txid, c.done_snapshot))
           AS unapplied,
       count(*) FILTER (WHERE c.partition IS NULL) AS without_checkpoint,
       count(*) FILTER (WHERE e.created_at >= %(cutoff)s) AS young,
       (SELECT count(*)
        FROM outbox_dead_letters AS d
        JOIN outbox_events AS x ON x.event_id = d.event_id AND x.segment = %(segment)s
        WHERE d.discarded_at IS NULL) AS waiting_dead_letters,
       pg_current_snapshot()::text AS seen
FROM outbox_events AS e
LEFT JOIN outbox_checkpoints AS c ON c.partition = e.partition
WHERE e.segment = %(segment)s

-- name: events_segment_fold
-- The events of a segment whose variant id is in [%(low)s, %(high)s], as the survey saw them,
-- folded into outbox_variant_baseline: the newest of each variant wins, as everywhere (replay starts
-- there). By ranges of variant ids, not of events, so that each variant's baseline row is written
-- at most once per segment, and only when the segment moves it forward; one range read of the
-- segment's variant_id index each. A discarded dead letter is skipped, as replay skips it.
WITH issued AS MATERIALIZED (
    SELECT outbox_versions_issued_v1() AS versions
), chunk AS MATERIALIZED (
    SELECT e.*, dl.event_id IS NOT NULL AS discarded
    FROM outbox_events AS e
    LEFT JOIN outbox_dead_letters AS dl ON dl.event_id = e.event_id
    WHERE e.segment = %(segment)s
      AND e.variant_id BETWEEN %(low)s::uuid AND %(high)s::uuid
      AND pg_visible_in_snapshot(e.txid, %(seen)s::pg_snapshot)
), baseline AS MATERIALIZED (
    SELECT outbox_variant_baseline_merge(ARRAY(
        SELECT (e.variant_id, e.job_id, e.variant_version,
                CASE WHEN d.readable THEN d.status END, CASE WHEN d.readable THEN d.step END,
                d.readable AND d.removed,
                CASE WHEN NOT d.readable THEN outbox_unreadable_problem_v1(e.event_id, NULL) END,
                e.event_id, NULL)::outbox_variant_states
        FROM chunk AS e
        CROSS JOIN issued AS i
        CROSS JOIN LATERAL outbox_event_decode_v1(
            e.event_type, e.schema_version, e.job_id, e.variant_id, e.variant_version, e.payload, i.versions) AS d
        WHERE NOT e.discarded AND e.job_id IS NOT NULL
          AND e.variant_version BETWEEN 1 AND i.versions
    )) AS merged
)
SELECT (SELECT count(*) FROM chunk) AS events, coalesce((SELECT merged FROM baseline), 0) AS baseline_updates

-- name: events_segment_truncate
SELECT outbox_events_segment_truncate(%(segment)s::smallint, %(seen)s::pg_snapshot) AS refusal

-- name: transitions_segment_count
SELECT count(*) FROM outbox_job_transitions WHERE segment = %(segment)s

-- name: transitions_segment_truncate
SELECT outbox_job_transitions_segment_truncate(%(segment)s::smallint, %(cutoff)s) AS refusal

-- name: outbox_analyze
-- After a prune: fresh statistics for the planner and for `outbox backlog`'s size estimate (a
-- WARNING, not an error, for a role that does not own the table).
ANALYZE outbox_events
