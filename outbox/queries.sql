-- The writer side's SQL: what outbox.create_job and outbox.update_variant run in the caller's
-- transaction. Each statement writes the change and its event together.

-- name: job_insert
INSERT INTO jobs (job_id, status, current_step, updated_at)
VALUES (%(job_id)s, 'queued', %(step)s, now())

-- name: variants_insert_with_events
-- outbox_version = 1 tells the capture trigger that this statement writes the events itself.
WITH inserted AS (
    INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step, updated_at, outbox_version)
    SELECT variant_id, %(job_id)s, 'queued', %(step)s, now(), 1
    FROM unnest(%(variant_ids)s::uuid[]) AS t (variant_id)
    RETURNING job_id, job_variants_id, outbox_version, status, current_step
)
SELECT outbox_append_variant_event(
    'variant_changed', job_id, job_variants_id, outbox_version, status, current_step)
FROM inserted

-- name: variant_update_with_event
-- Bumping outbox_version here (under the row lock this UPDATE takes) tells the capture trigger
-- that this statement writes the event itself.
WITH updated AS (
    UPDATE jobs_variants
    SET status = %(status)s,
        current_step = coalesce(%(step)s, current_step),
        updated_at = now(),
        outbox_version = outbox_version + 1
    WHERE job_variants_id = %(variant_id)s
    RETURNING job_id, job_variants_id, outbox_version, status, current_step
)
SELECT outbox_append_variant_event(
    'variant_changed', job_id, job_variants_id, outbox_version, status, current_step)
FROM updated
