-- The writer side's SQL: what outbox.create_job and outbox.update_variant run in the caller's
-- transaction. The capture trigger installed by `outbox migrate` appends each change's event in
-- the same transaction, as it does for the application's own SQL.

-- The columns' own types (text, varchar(n), an enum, a domain) are written through the cast
-- functions `outbox migrate` keeps for them (processor/app_schema.py).

-- name: job_create
-- The job and its variants in one statement: it is all or nothing even on a connection outside a
-- transaction (autocommit). The first variant is inserted with VALUES, so that the application's
-- own columns (the /*...*/ slots, filled by outbox.writer) take their values as a plain INSERT
-- would (the column's type, its length checked); the other variants copy that row's typed values.
-- The columns' own types for status and step are written through the cast functions `outbox
-- migrate` keeps for them (processor/app_schema.py).
WITH job AS (
    INSERT INTO jobs (job_id, status, current_step, updated_at /*job columns*/)
    VALUES (%(job_id)s, outbox_job_status('queued'), outbox_job_step(%(step)s), now() /*job values*/)
), first_variant AS (
    INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step, updated_at /*variant columns*/)
    VALUES (%(first_variant_id)s, %(job_id)s, outbox_variant_status('queued'), outbox_variant_step(%(step)s), now()
            /*variant values*/)
    RETURNING job_id, status, current_step, updated_at /*variant columns*/
)
INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step, updated_at /*variant columns*/)
SELECT t.variant_id, f.job_id, f.status, f.current_step, f.updated_at /*variant copies*/
FROM unnest(CAST(%(other_variant_ids)s AS uuid[])) WITH ORDINALITY AS t (variant_id, n)
CROSS JOIN first_variant AS f
ORDER BY t.n

-- fragment: trace_context
-- The caller's trace context (W3C traceparent), for the events captured after it in this
-- transaction: the capture trigger copies it into outbox_events.trace_parent (migration 0013). Set
-- by the write API only when the caller has a span (plain SQL writers never set it): before
-- job_create, as a statement of its own (trace_context_set); in variant_update_traced, as a
-- condition of the UPDATE itself (no round trip more, and the same transaction on a connection in
-- autocommit: the row's capture fires at the end of the statement, after the condition set it).
set_config('outbox.traceparent', CAST(%(traceparent)s AS text), true) IS NOT NULL

-- name: trace_context_set
SELECT {{trace_context}}

-- name: pipeline_has_step
-- Whether the pipeline every worker folds with (outbox_fold_config) has this step, and the pipeline.
SELECT CAST(%(step)s AS text) = ANY(pipeline_steps), pipeline_steps FROM outbox_fold_config

-- fragment: variant_change
-- No RETURNING: the row count says whether the variant exists, and a result set costs the server a
-- row to send and the client (above all SQLAlchemy) a result to build (bench/HISTORY.md, "Writer path").
-- A step outside the pipeline is refused here (no row changes; update_variant then says why): the
-- job could not be folded. CAST, not ::, so that SQLAlchemy's text() (asyncpg) reads the parameters.
UPDATE jobs_variants
SET status = outbox_variant_status(%(status)s),
    current_step = coalesce(outbox_variant_step(CAST(%(step)s AS text)), current_step),
    updated_at = now()
WHERE job_variants_id = %(variant_id)s
  AND (CAST(%(step)s AS text) IS NULL
       OR EXISTS (SELECT FROM outbox_fold_config WHERE CAST(%(step)s AS text) = ANY(pipeline_steps)))

-- name: variant_update
-- outbox.update_variant (the UPDATE: fragment variant_change).
{{variant_change}}

-- name: variant_update_traced
-- The same, for a caller with a span: its trace context is set by a condition of the UPDATE itself.
{{variant_change}}
  AND {{trace_context}}

-- name: job_hold
-- outbox.hold_job (migration 0010: the function writes the job's row with the owner's rights).
SELECT outbox_hold_job(%(job_id)s, %(status)s, %(step)s, %(reason)s)

-- name: job_release
SELECT outbox_release_job(%(job_id)s)
