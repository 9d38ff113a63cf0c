-- The writer side's SQL: what outbox.create_job and outbox.update_variant run in the caller's
-- transaction. The capture trigger installed by `outbox migrate` appends each change's event in
-- the same transaction, as it does for the application's own SQL.

-- name: job_insert
INSERT INTO jobs (job_id, status, current_step, updated_at)
VALUES (%(job_id)s, 'queued', %(step)s, now())

-- name: variants_insert
INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step, updated_at)
SELECT variant_id, %(job_id)s, 'queued', %(step)s, now()
FROM unnest(%(variant_ids)s::uuid[]) AS t (variant_id)

-- name: variant_update
-- No RETURNING: the row count says whether the variant exists, and a result set costs the server a
-- row to send and the client (above all SQLAlchemy) a result to build (bench/README.md, "Writer path").
UPDATE jobs_variants
SET status = %(status)s,
    current_step = coalesce(%(step)s, current_step),
    updated_at = now()
WHERE job_variants_id = %(variant_id)s
