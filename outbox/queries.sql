-- The writer side's SQL: what outbox.create_job and outbox.update_variant run in the caller's
-- transaction. The capture trigger installed by `outbox migrate` appends each change's event in
-- the same transaction, as it does for the application's own SQL.

-- The columns' own types (text, varchar(n), an enum, a domain) are written through the cast
-- functions `outbox migrate` keeps for them (processor/app_schema.py).

-- name: job_insert
-- /*columns*/ and /*values*/ take the application's own columns given to create_job.
INSERT INTO jobs (job_id, status, current_step, updated_at /*columns*/)
VALUES (%(job_id)s, outbox_job_status('queued'), outbox_job_step(%(step)s), now() /*values*/)

-- name: variants_insert
-- The values of the application's own columns are cast to the columns' types (columns_describe):
-- a parameter in a SELECT list would otherwise be text, which asyncpg sends as it is told.
INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step, updated_at /*columns*/)
SELECT variant_id, CAST(%(job_id)s AS uuid), outbox_variant_status('queued'), outbox_variant_step(%(step)s), now() /*values*/
FROM unnest(CAST(%(variant_ids)s AS uuid[])) AS t (variant_id)

-- name: columns_describe
-- The application's own columns given to create_job, as they exist: each one's name, quoted name
-- and type. A name with no row is not a column of that table.
SELECT t.table_name, a.attname::text, quote_ident(a.attname), format_type(a.atttypid, a.atttypmod)
FROM (VALUES ('jobs', CAST(%(job_columns)s AS text[])),
             ('jobs_variants', CAST(%(variant_columns)s AS text[]))) AS t (table_name, names)
JOIN pg_attribute AS a
  ON a.attrelid = to_regclass(t.table_name) AND a.attname = ANY (t.names) AND a.attnum > 0 AND NOT a.attisdropped

-- name: pipeline_has_step
-- Whether the pipeline every worker folds with (outbox_fold_config) has this step, and the pipeline.
SELECT CAST(%(step)s AS text) = ANY(pipeline_steps), pipeline_steps FROM outbox_fold_config

-- name: variant_update
-- No RETURNING: the row count says whether the variant exists, and a result set costs the server a
-- row to send and the client (above all SQLAlchemy) a result to build (bench/README.md, "Writer path").
-- A step outside the pipeline is refused here (no row changes; update_variant then says why): the
-- job could not be folded. CAST, not ::, so that SQLAlchemy's text() (asyncpg) reads the parameters.
UPDATE jobs_variants
SET status = outbox_variant_status(%(status)s),
    current_step = coalesce(outbox_variant_step(CAST(%(step)s AS text)), current_step),
    updated_at = now()
WHERE job_variants_id = %(variant_id)s
  AND (CAST(%(step)s AS text) IS NULL
       OR EXISTS (SELECT FROM outbox_fold_config WHERE CAST(%(step)s AS text) = ANY(pipeline_steps)))

-- name: job_hold
-- outbox.hold_job (migration 0010: the function writes the job's row with the owner's rights).
SELECT outbox_hold_job(%(job_id)s, %(status)s, %(step)s, %(reason)s)

-- name: job_release
SELECT outbox_release_job(%(job_id)s)
