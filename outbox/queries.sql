-- The writer side's SQL: what outbox.create_job and outbox.update_variant run in the caller's
-- transaction. The capture trigger installed by `outbox migrate` appends each change's event in
-- the same transaction, as it does for the application's own SQL.

-- The columns' own types (text, varchar(n), an enum, a domain) are written through the cast
-- functions `outbox migrate` keeps for them (processor/app_schema.py).

-- name: job_insert
INSERT INTO jobs (job_id, status, current_step, updated_at)
VALUES (%(job_id)s, outbox_job_status('queued'), outbox_job_step(%(step)s), now())

-- name: variants_insert
INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step, updated_at)
SELECT variant_id, %(job_id)s, outbox_variant_status('queued'), outbox_variant_step(%(step)s), now()
FROM unnest(%(variant_ids)s::uuid[]) AS t (variant_id)

-- name: pipeline_has_step
-- Whether the pipeline every worker folds with (outbox_fold_config) has this step, and the pipeline.
SELECT %(step)s = ANY(pipeline_steps), pipeline_steps FROM outbox_fold_config

-- name: variant_update
-- No RETURNING: the row count says whether the variant exists, and a result set costs the server a
-- row to send and the client (above all SQLAlchemy) a result to build (bench/README.md, "Writer path").
-- A step outside the pipeline is refused here (no row changes; update_variant then says why): the
-- job could not be folded.
UPDATE jobs_variants
SET status = outbox_variant_status(%(status)s),
    current_step = coalesce(outbox_variant_step(%(step)s), current_step),
    updated_at = now()
WHERE job_variants_id = %(variant_id)s
  AND (%(step)s::text IS NULL OR EXISTS (SELECT FROM outbox_fold_config WHERE %(step)s::text = ANY(pipeline_steps)))

-- name: job_hold
-- outbox.hold_job (migration 0010: the function writes the job's row with the owner's rights).
SELECT outbox_hold_job(%(job_id)s, %(status)s, %(step)s, %(reason)s)

-- name: job_release
SELECT outbox_release_job(%(job_id)s)
