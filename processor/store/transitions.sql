-- Job transitions and their subscriptions as an operator manages them (processor/store/transitions.py):
-- `outbox subscriptions create|list|reset|drop|failures|retry`, `outbox transitions`, and one job's
-- for `outbox explain`. What a subscription's consumer runs (outbox.Subscriber) stays in
-- outbox/transitions.sql.

-- name: subscription_create
-- --from start: every transition still kept; --from now: those written from now on.
INSERT INTO outbox_subscriptions (name, position, to_statuses)
SELECT %(name)s,
       CASE WHEN %(from_start)s THEN 0 ELSE coalesce((SELECT max(transition_id) FROM outbox_job_transitions), 0) END,
       %(to_statuses)s::text[]
ON CONFLICT (name) DO NOTHING
RETURNING position

-- name: subscription_reset
-- Moves a subscription's position (start, now, or a transition id) and forgets its failures:
-- the consumer delivers from there again.
WITH failures AS (
    DELETE FROM outbox_subscription_failures WHERE subscription = %(name)s
)
UPDATE outbox_subscriptions
SET position = CASE %(to)s::text
                   WHEN 'start' THEN 0
                   WHEN 'now' THEN coalesce((SELECT max(transition_id) FROM outbox_job_transitions), 0)
                   ELSE %(to)s::bigint
               END,
    acknowledged_at = now()
WHERE name = %(name)s
RETURNING position

-- name: subscription_drop
DELETE FROM outbox_subscriptions WHERE name = %(name)s RETURNING name

-- name: subscriptions_list
-- Each subscription with its lag: transitions after its position that pass its filter (counted
-- up to a bound: an index range, not the table), the age of the oldest, and its failures.
SELECT s.name, s.position, s.to_statuses, s.created_at, s.acknowledged_at,
       lag.transitions AS lag, lag.oldest AS oldest_unacknowledged,
       (SELECT count(*) FROM outbox_subscription_failures AS f WHERE f.subscription = s.name AND f.parked_at IS NOT NULL)
           AS parked,
       (SELECT count(*) FROM outbox_subscription_failures AS f WHERE f.subscription = s.name AND f.parked_at IS NULL)
           AS retrying,
       coalesce((SELECT max(transition_id) FROM outbox_job_transitions), 0) AS head
FROM outbox_subscriptions AS s
CROSS JOIN LATERAL (
    SELECT count(*) AS transitions, min(t.transitioned_at) AS oldest
    FROM (SELECT t.transitioned_at
          FROM outbox_job_transitions AS t
          WHERE t.transition_id > s.position
            AND (s.to_statuses IS NULL OR t.to_status = ANY(s.to_statuses))
          ORDER BY t.transition_id
          LIMIT %(count_limit)s) AS t
) AS lag
WHERE %(name)s::text IS NULL OR s.name = %(name)s
ORDER BY s.name

-- name: subscription_failures_list
SELECT f.transition_id, f.attempts, f.last_error, f.failed_at, f.parked_at, t.job_id, t.to_status, t.to_step
FROM outbox_subscription_failures AS f
LEFT JOIN outbox_job_transitions AS t USING (transition_id)
WHERE f.subscription = %(name)s
ORDER BY f.transition_id

-- name: subscription_unpark
-- `outbox subscriptions retry`: parked transitions go back to the consumer, which delivers them
-- before anything new (transitions_page), with their attempts counted afresh.
UPDATE outbox_subscription_failures
SET parked_at = NULL, attempts = 0
WHERE subscription = %(name)s AND parked_at IS NOT NULL
  AND (%(transition_id)s::bigint IS NULL OR transition_id = %(transition_id)s)
RETURNING transition_id

-- name: transitions_list
-- `outbox transitions`: in order, after an id, of one job or all.
SELECT transition_id, job_id, partition, from_status, from_step, to_status, to_step, written_by, transitioned_at
FROM outbox_job_transitions
WHERE transition_id > %(after)s
  AND (%(job_id)s::uuid IS NULL OR job_id = %(job_id)s)
ORDER BY transition_id
LIMIT %(limit)s

-- name: transitions_listen
-- `outbox transitions --follow` waits for a NOTIFY on this channel (sent once per transaction that wrote
-- transitions).
LISTEN outbox_transitions

-- name: job_transitions_recent
-- The job's newest transitions, newest first.
SELECT transition_id, job_id, partition, from_status, from_step, to_status, to_step, written_by, transitioned_at
FROM outbox_job_transitions
WHERE job_id = %(job_id)s
ORDER BY transition_id DESC
LIMIT %(limit)s
