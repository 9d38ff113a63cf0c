-- The writes of the pipeline's own application, as the demo, the tests and the benchmarks simulate
-- them (processor/workload.py). Nothing here runs in a worker: the capture triggers turn these
-- plain statements into events, as they do for an application that never calls the outbox API.

-- name: variant_update
-- A variant moves (the same columns outbox.update_variant writes); updated_at alone writes no event.
UPDATE jobs_variants
SET status = %(status)s, current_step = %(step)s, updated_at = now()
WHERE job_variants_id = %(variant_id)s

-- name: variant_move
-- The variant now belongs to another job (of another partition, perhaps).
UPDATE jobs_variants SET job_id = %(job_id)s WHERE job_variants_id = %(variant_id)s

-- name: variant_insert
-- A variant added to a job by plain SQL rather than outbox.create_job.
INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step, updated_at)
VALUES (%(variant_id)s, %(job_id)s, %(status)s, %(step)s, now())

-- name: variant_delete
DELETE FROM jobs_variants WHERE job_variants_id = %(variant_id)s

-- name: jobs_finish
-- Every variant of the jobs done at the final step.
UPDATE jobs_variants SET status = 'done', current_step = %(final_step)s WHERE job_id = ANY(%(job_ids)s)

-- name: jobs_summary
-- stuck: every variant is done at the final step, yet the job is not done (the original bug).
SELECT count(*) FILTER (WHERE j.status = 'done') AS done,
       count(*) FILTER (WHERE v.all_final AND j.status IS DISTINCT FROM 'done') AS stuck,
       count(*) AS total
FROM jobs AS j
JOIN LATERAL (
    SELECT bool_and(status = 'done' AND current_step = %(final_step)s) AS all_final
    FROM jobs_variants
    WHERE job_id = j.job_id
) AS v ON true
WHERE j.job_id = ANY(%(job_ids)s::uuid[])
