-- 0006: partitioned scale-out: the partition count, the md5 partition hash written into
-- outbox_partition_of, and capture of a variant moved to another job in the partition it left.
--
-- Why: docs/decisions/0010-partition-by-md5.md.

-- The partition count. Changed only by `outbox repartition`, which waits for a drained outbox
-- while writers are held back (processor/repartition.py): events are never routed by a count
-- that the checkpoints do not have.
CREATE TABLE outbox_partitioning (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    partitions integer NOT NULL DEFAULT 1 CHECK (partitions BETWEEN 1 AND 1024),
    changed_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO outbox_partitioning DEFAULT VALUES;

-- The hash: the first 32 bits of md5 of the job id's text, modulo the count. Stable across
-- PostgreSQL versions and platforms (PostgreSQL's own hash functions promise neither), uniform for
-- any kind of UUID (time-ordered ones too), and easy to compute elsewhere:
-- int(hashlib.md5(str(job_id).encode()).hexdigest()[:8], 16) % partitions.
CREATE FUNCTION outbox_partition_hash(p_job_id uuid, p_partitions integer) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN p_partitions = 1 THEN 0
                ELSE ((('x' || substr(md5(p_job_id::text), 1, 8))::bit(32)::bigint) % p_partitions)::integer END
$$;

-- Writes the count into outbox_partition_of's body: the function every writer path calls stays
-- IMMUTABLE (inlined, no table read per event), and replacing it invalidates the writers' cached
-- plans. Called only by `outbox repartition`, inside its transaction.
CREATE FUNCTION outbox_partitions_set(p_partitions integer) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE outbox_partitioning SET partitions = p_partitions, changed_at = now();
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION outbox_partition_of(p_job_id uuid) RETURNS integer '
        'LANGUAGE sql IMMUTABLE PARALLEL SAFE AS %L',
        format('SELECT outbox_partition_hash(p_job_id, %s)', p_partitions));
END
$$;

-- A variant that moves to another job also leaves a variant_removed event for the job it left, in
-- that job's partition: each partition's worker learns of the move from its own events, and
-- refolds only jobs of its own partition.
CREATE OR REPLACE FUNCTION outbox_capture_variant_change() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        -- Refuse at write time what the processor could never fold, so nothing wrong is recorded.
        IF NEW.status IS NULL OR NEW.status NOT IN ('queued', 'running', 'done', 'failed') THEN
            RAISE EXCEPTION 'jobs_variants.status must be one of queued, running, done, failed (got %)',
                coalesce(quote_literal(NEW.status), 'NULL')
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    -- The variant leaves its job: deleted, given another id, detached (job_id set to NULL), or
    -- moved to another job.
    IF TG_OP = 'DELETE'
       OR (TG_OP = 'UPDATE' AND (OLD.job_variants_id IS DISTINCT FROM NEW.job_variants_id
                                 OR OLD.job_id IS DISTINCT FROM NEW.job_id)) THEN
        IF OLD.job_id IS NOT NULL THEN
            PERFORM outbox_append_variant_event('variant_removed', OLD.job_id, OLD.job_variants_id, NULL, NULL);
        END IF;
    END IF;
    -- A variant without a job has nothing to fold; it is captured once it gets one.
    IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.job_id IS NOT NULL THEN
        PERFORM outbox_append_variant_event(
            'variant_changed', NEW.job_id, NEW.job_variants_id, NEW.status, NEW.current_step);
    END IF;
    RETURN NULL;
END
$$;
