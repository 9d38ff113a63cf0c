-- Each variant's newest state (outbox_variant_states), as events made it: merged in (the newest of
-- each variant wins: outbox_variant_states_merge_v1, through outbox_variant_states_newest, the rule's
-- one home in SQL) and read for the fold. processor/store/variant_states.py runs these.

-- name: variant_states_upsert
-- Merges states decoded in Python (problem states) into outbox_variant_states. Returns the jobs
-- to fold again: the variants' jobs now, and before (a variant moved to another job: moved_from).
-- With awaiting_fold, the jobs go to outbox_dirty_jobs instead (they await their fold until the
-- catch-up is complete) and none is returned.
WITH upserted AS MATERIALIZED (  -- evaluated exactly once: it writes
    SELECT merged_job_id AS job_id, merged_moved_from AS moved_from
    FROM outbox_variant_states_merge_v1(ARRAY(
        SELECT (variant_id, job_id, version, status, step, removed, problem, event_id, NULL)::outbox_variant_states
        FROM unnest(
            %(variant_ids)b::uuid[], %(job_ids)b::uuid[], %(versions)b::bigint[], %(statuses)b::text[],
            %(steps)b::text[], %(removed)b::boolean[], %(problems)b::text[], %(event_ids)b::bigint[]
        ) AS t (variant_id, job_id, version, status, step, removed, problem, event_id)
    ))
), affected AS (
    SELECT job_id FROM upserted
    UNION
    -- Jobs that variants left, in this partition (see events_apply).
    SELECT moved_from
    FROM upserted
    WHERE moved_from IS NOT NULL AND outbox_partition_of(moved_from) = %(partition)s
), awaiting_fold AS (
    INSERT INTO outbox_dirty_jobs (partition, job_id)
    SELECT %(partition)s, job_id FROM affected WHERE %(awaiting_fold)s
    ON CONFLICT DO NOTHING
)
SELECT job_id FROM affected WHERE NOT %(awaiting_fold)s

-- name: variant_states_to_fold
-- What the fold needs of each job: one row per distinct state among its variants (with one of
-- them as example), removed variants left out. The fold depends only on which states occur, not
-- on how many variants share one (tests/unit/test_fold.py checks it), and a job's variants mostly
-- share a few states: far fewer rows than variants. A dead letter that holds its job (0009) is
-- a problem the fold reports; the check costs nothing while there is none.
SELECT job_id, (array_agg(variant_id))[1] AS variant_id, max(version) AS version, status, step, problem
FROM outbox_variant_states
WHERE job_id = ANY(%(job_ids)s::uuid[])
  AND NOT removed
GROUP BY job_id, status, step, problem
UNION ALL
SELECT job_id, coalesce(variant_id, '00000000-0000-0000-0000-000000000000'::uuid), 0, NULL, NULL,
       outbox_unreadable_problem_v1(event_id, reason)
FROM outbox_dead_letters
WHERE job_id = ANY(%(job_ids)s::uuid[])
  AND holds_job
  AND discarded_at IS NULL
  AND EXISTS (SELECT FROM outbox_dead_letters WHERE holds_job AND discarded_at IS NULL)

-- name: replay_variants_of_jobs
-- Every variant that belongs or belonged to the jobs, from every place that knows of it.
SELECT variant_id FROM outbox_variant_states WHERE job_id = ANY(%(job_ids)s::uuid[])
UNION
SELECT variant_id FROM outbox_variant_baseline WHERE job_id = ANY(%(job_ids)s::uuid[])
UNION
SELECT job_variants_id FROM jobs_variants WHERE job_id = ANY(%(job_ids)s::uuid[])

-- name: variant_states_rebuild
-- Replay's rebuild of these variants, under every checkpoint's lock (checkpoints_lock_all): each
-- one's state becomes the newest (outbox_variant_states_newest) of its baseline (what prune folded)
-- and its applied events, each event judged applied by its own partition's checkpoint, so that a
-- variant that moved between jobs of two partitions is rebuilt from both. Discarded dead letters
-- and events with no place in the order (no job, or a version capture never issued) never count;
-- a dead letter (or an unreadable event) gives a problem state with its reason, as the drain made
-- it. A variant with nothing at all loses its stored state. Returns the jobs the variants were in before and are in
-- now: each of them is folded again.
WITH issued AS MATERIALIZED (
    SELECT outbox_versions_issued_v1() AS versions
), candidates AS (
    SELECT (b.variant_id, b.job_id, b.version, b.status, b.step, b.removed, b.problem, b.event_id, NULL)::outbox_variant_states AS state
    FROM outbox_variant_baseline AS b
    WHERE b.variant_id = ANY(%(variant_ids)s::uuid[])
    UNION ALL
    -- As the drain made it: a dead letter is the problem state of its version (whatever its payload
    -- says now: `dead-letters retry` is what applies a fixed one), else the decoded state.
    SELECT (e.variant_id, e.job_id, e.variant_version,
            CASE WHEN usable THEN d.status END, CASE WHEN usable THEN d.step END, usable AND d.removed,
            CASE WHEN NOT usable THEN outbox_unreadable_problem_v1(e.event_id, dl.reason) END,
            e.event_id, NULL)::outbox_variant_states
    FROM outbox_events AS e
    JOIN outbox_checkpoints AS c ON c.partition = e.partition
    CROSS JOIN issued AS i
    CROSS JOIN LATERAL outbox_event_decode_v1(
        e.event_type, e.schema_version, e.job_id, e.variant_id, e.variant_version, e.payload, i.versions) AS d
    LEFT JOIN outbox_dead_letters AS dl ON dl.event_id = e.event_id
    CROSS JOIN LATERAL (SELECT dl.event_id IS NULL AND d.readable AS usable) AS u
    WHERE e.variant_id = ANY(%(variant_ids)s::uuid[])
      AND e.job_id IS NOT NULL
      AND e.variant_version BETWEEN 1 AND i.versions
      AND outbox_event_applied_v1(e.txid, e.event_id, c.done_snapshot, c.target_snapshot, c.last_txid, c.last_event_id)
      -- Discarded, or holding its job (it has no place in the order): never a state.
      AND dl.discarded_at IS NULL
      AND NOT coalesce(dl.holds_job, false)
), rebuilt AS MATERIALIZED (
    SELECT * FROM outbox_variant_states_newest(ARRAY(SELECT state FROM candidates))
), before AS MATERIALIZED (
    SELECT variant_id, job_id FROM outbox_variant_states WHERE variant_id = ANY(%(variant_ids)s::uuid[]) FOR UPDATE
), dropped AS (
    DELETE FROM outbox_variant_states
    WHERE variant_id = ANY(%(variant_ids)s::uuid[]) AND variant_id NOT IN (SELECT variant_id FROM rebuilt)
), replaced AS (
    INSERT INTO outbox_variant_states AS s (variant_id, job_id, version, status, step, removed, problem, event_id)
    SELECT variant_id, job_id, version, status, step, removed, problem, event_id FROM rebuilt
    ON CONFLICT (variant_id) DO UPDATE
        SET job_id = excluded.job_id, version = excluded.version, status = excluded.status, step = excluded.step,
            removed = excluded.removed, problem = excluded.problem, event_id = excluded.event_id, moved_from = NULL
)
SELECT job_id FROM before
UNION
SELECT job_id FROM rebuilt
