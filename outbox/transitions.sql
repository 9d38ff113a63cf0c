-- Job transitions and the subscriptions that follow them (migration 0012): what outbox.Subscriber,
-- outbox.aio.AsyncSubscriber, `outbox transitions`, `outbox subscriptions` and `outbox deliver` run.
--
-- A transition's id is a complete position (the migration's header says why): a subscription has
-- seen exactly the transitions up to its position.

-- name: transitions_page
-- The next transitions of a subscription, in order, after its position: first those whose parking
-- an operator undid (`outbox subscriptions retry`), then the new ones that pass its filter, each
-- with the attempts made so far and when the last one failed (by the database's clock, as the
-- read's time is). head is the newest transition this statement sees: once every
-- transition of a page that is not full is acknowledged, the position may move up to it (none
-- between them passes the filter).
WITH sub AS MATERIALIZED (
    SELECT position, to_statuses FROM outbox_subscriptions WHERE name = %(name)s
), candidates AS (
    (SELECT t.*
     FROM outbox_subscription_failures AS f
     JOIN outbox_job_transitions AS t USING (transition_id)
     WHERE f.subscription = %(name)s AND f.parked_at IS NULL AND f.transition_id <= (SELECT position FROM sub)
     ORDER BY f.transition_id
     LIMIT %(limit)s)
    UNION ALL
    (SELECT t.*
     FROM outbox_job_transitions AS t
     WHERE t.transition_id > (SELECT position FROM sub)
       AND ((SELECT to_statuses FROM sub) IS NULL OR t.to_status = ANY((SELECT to_statuses FROM sub)::text[]))
     ORDER BY t.transition_id
     LIMIT %(limit)s)
)
-- The columns are read by name through outbox.subscription.PageRow, which lists them in this order.
SELECT c.transition_id, c.job_id, c.partition, c.from_status, c.from_step, c.to_status, c.to_step,
       c.written_by, c.transitioned_at, coalesce(f.attempts, 0) AS attempts, f.failed_at,
       (SELECT position FROM sub) AS position, (SELECT max(transition_id) FROM outbox_job_transitions) AS head,
       clock_timestamp() AS read_at,
       c.trace_parent  -- the trace context of the event that caused it (0013): the handler's span is its child
FROM candidates AS c
LEFT JOIN outbox_subscription_failures AS f ON f.subscription = %(name)s AND f.transition_id = c.transition_id
UNION ALL
-- Always one row, so that an empty page still says the position (NULL: no such subscription).
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       (SELECT position FROM sub), (SELECT max(transition_id) FROM outbox_job_transitions), clock_timestamp(), NULL
ORDER BY 1 NULLS LAST
LIMIT %(limit)s + 1

-- name: subscription_fence
-- The first statement of every transaction that acknowledges: the subscription's row, locked, so
-- that a second consumer of it (a zombie, one that got past the advisory lock through a pooler)
-- waits, then sees the position moved and acknowledges nothing.
SELECT position FROM outbox_subscriptions WHERE name = %(name)s FOR UPDATE

-- name: subscription_fence_redelivery
-- For a parked transition given back (`outbox subscriptions retry`), after subscription_fence: its
-- failure row, locked, is what says it still waits (the position does not move when it is
-- delivered); a second consumer finds it gone and delivers nothing.
SELECT 1 FROM outbox_subscription_failures
WHERE subscription = %(name)s AND transition_id = %(transition_id)s AND parked_at IS NULL
FOR UPDATE

-- name: subscription_acknowledge
-- Acknowledges a transition delivered (or parked) in this transaction: the position moves to it
-- (never back: a redelivered parked transition lies behind it), and its failure record goes.
WITH failure AS (
    DELETE FROM outbox_subscription_failures
    WHERE subscription = %(name)s AND transition_id = %(transition_id)s AND parked_at IS NULL
)
UPDATE outbox_subscriptions
SET position = greatest(position, %(position)s), acknowledged_at = now()
WHERE name = %(name)s

-- name: subscription_failure_record
-- A failed attempt, in a transaction of its own after the handler's rolled back. Returns the
-- attempts made so far.
INSERT INTO outbox_subscription_failures AS f (subscription, transition_id, attempts, last_error)
VALUES (%(name)s, %(transition_id)s, 1, %(error)s)
ON CONFLICT (subscription, transition_id) DO UPDATE
    SET attempts = f.attempts + 1, last_error = excluded.last_error, failed_at = now()
RETURNING attempts

-- name: subscription_park
-- Gives up on a transition after its last attempt (under subscription_fence): it stays listed
-- with its error, and the position moves past it.
WITH parked AS (
    UPDATE outbox_subscription_failures SET parked_at = now()
    WHERE subscription = %(name)s AND transition_id = %(transition_id)s
)
UPDATE outbox_subscriptions
SET position = greatest(position, %(transition_id)s), acknowledged_at = now()
WHERE name = %(name)s

-- name: subscription_listen
LISTEN outbox_transitions

-- name: subscription_unlisten
UNLISTEN outbox_transitions

-- name: subscriber_session_limits
-- On the connections a consumer opens: a session left idle, or idle inside a transaction, longer
-- than the consumer's session_timeout is ended by the server (a frozen process): its lock and its
-- subscription's row go with it, and a standby takes over. A handler must finish within it.
SELECT set_config('idle_session_timeout', %(timeout)s, false),
       set_config('idle_in_transaction_session_timeout', %(timeout)s, false)

-- name: subscriber_session_limits_reset
-- A pooled connection goes back to its pool with the server's settings.
SELECT set_config('idle_session_timeout', (SELECT reset_val FROM pg_settings WHERE name = 'idle_session_timeout'), false),
       set_config('idle_in_transaction_session_timeout',
                  (SELECT reset_val FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'), false)

-- name: subscriber_lock_try
-- One active consumer per subscription: a session lock on the subscription's name (another class
-- than the workers' locks).
SELECT pg_try_advisory_lock(%(lock_class)s, hashtext(%(name)s))

-- name: subscriber_lock_release
SELECT pg_advisory_unlock(%(lock_class)s, hashtext(%(name)s))
