-- What `outbox prune` runs (processor/store/retention.py): applied events folded into the baseline and
-- deleted, job transitions that no subscription still needs, and fresh statistics afterwards.

-- name: cutoff_get
-- The database's clock minus a duration: what `outbox prune --older-than` removes is older than this.
SELECT clock_timestamp() - %(interval)s::interval

-- name: events_lock_for_prune
-- The lock prune's DELETE takes anyway, taken first (see processor/prune.py).
LOCK TABLE outbox_events IN ROW EXCLUSIVE MODE

-- name: prune_chunk
-- One round of `outbox prune` in partition %(partition)s, under its checkpoint's lock: the events
-- to remove (applied, older than the cutoff, not a dead letter waiting for retry or discard) are
-- folded into outbox_variant_baseline (the newest of each variant wins, as everywhere: replay
-- starts from there), then deleted with their discarded dead letters.
WITH issued AS MATERIALIZED (
    SELECT outbox_versions_issued_v1() AS versions
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
                CASE WHEN NOT d.readable THEN outbox_unreadable_problem_v1(e.event_id, NULL) END,
                e.event_id, NULL)::outbox_variant_states
        FROM doomed AS e
        CROSS JOIN issued AS i
        CROSS JOIN LATERAL outbox_event_decode_v1(
            e.event_type, e.schema_version, e.job_id, e.variant_id, e.variant_version, e.payload, i.versions) AS d
        WHERE NOT e.discarded AND e.variant_id IS NOT NULL AND e.job_id IS NOT NULL
          AND e.variant_version BETWEEN 1 AND i.versions
    )) AS merged
), letters AS (
    DELETE FROM outbox_dead_letters WHERE event_id IN (SELECT event_id FROM doomed WHERE discarded)
), deleted AS (
    DELETE FROM outbox_events WHERE event_id IN (SELECT event_id FROM doomed) RETURNING 1
)
SELECT (SELECT count(*) FROM deleted) AS events_deleted, coalesce((SELECT merged FROM baseline), 0) AS baseline_updates

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

-- name: outbox_analyze
-- After a prune: fresh statistics for the planner and for `outbox backlog`'s size estimate (a
-- WARNING, not an error, for a role that does not own the table).
ANALYZE outbox_events
