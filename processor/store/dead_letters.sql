-- Dead letters as operators handle them (processor/store/dead_letters.py): list, retry, discard, and
-- one job's for `outbox explain`. Retry and discard run under every checkpoint's lock
-- (processor/dead_letters.py), then rebuild the event's job (processor.replay.rebuild_jobs).

-- name: dead_letters_list
-- `outbox dead-letters list`: with their event (unless pruned).
SELECT d.event_id, d.partition, d.job_id, d.variant_id, d.reason, d.parked_at, d.discarded_at,
       e.event_type, e.schema_version, e.created_at AS written_at, d.holds_job
FROM outbox_dead_letters AS d
LEFT JOIN outbox_events AS e USING (event_id)
WHERE (%(include_discarded)s OR d.discarded_at IS NULL)
ORDER BY d.event_id
LIMIT %(limit)s

-- name: dead_letter_event_get
-- A dead letter's event, read as the drain reads events (processor.decode), for a retry.
SELECT e.event_id, e.txid::text AS txid, e.event_type, e.schema_version, e.job_id, e.variant_id,
       e.variant_version, outbox_event_payload(e.payload) AS payload, e.created_at,
       e.variant_version BETWEEN 1 AND (SELECT outbox_versions_issued_v1()) AS version_issued, d.discarded_at
FROM outbox_dead_letters AS d
JOIN outbox_events AS e USING (event_id)
WHERE d.event_id = %(event_id)s

-- name: dead_letter_reason_update
UPDATE outbox_dead_letters SET reason = %(reason)s, holds_job = %(holds_job)s, parked_at = now()
WHERE event_id = %(event_id)s

-- name: dead_letter_delete
DELETE FROM outbox_dead_letters WHERE event_id = %(event_id)s

-- name: dead_letter_discard
-- Idempotent: an already discarded letter keeps its first discarded_at and is still returned.
UPDATE outbox_dead_letters SET discarded_at = coalesce(discarded_at, now())
WHERE event_id = %(event_id)s
RETURNING job_id, variant_id

-- name: dead_letters_partitions
SELECT event_id, partition FROM outbox_dead_letters WHERE event_id = ANY(%(event_ids)s::bigint[])

-- name: job_dead_letters_list
-- The job's dead letters, newest first, discarded ones too (with their event, unless pruned).
SELECT d.event_id, d.variant_id, d.reason, d.holds_job, d.parked_at, d.discarded_at, e.event_type,
       e.created_at
FROM outbox_dead_letters AS d
LEFT JOIN outbox_events AS e USING (event_id)
WHERE d.job_id = %(job_id)s
ORDER BY d.event_id DESC
LIMIT %(limit)s

-- name: dead_letters_park
-- Events that cannot be applied, parked with the reason in the batch's transaction (the one that
-- moves the checkpoint past them).
WITH parked AS (
    INSERT INTO outbox_dead_letters (event_id, partition, job_id, variant_id, reason, holds_job)
    SELECT event_id, %(partition)s, job_id, variant_id, reason, holds_job
    FROM unnest(%(dead_event_ids)b::bigint[], %(dead_job_ids)b::uuid[], %(dead_variant_ids)b::uuid[],
                %(dead_reasons)b::text[], %(dead_holds_job)b::boolean[])
        AS t (event_id, job_id, variant_id, reason, holds_job)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
)
SELECT count(*) FROM parked
