-- 0001: the application's tables (created when missing, adopted when present), the outbox, the
-- capture trigger, the adoption backfill, and the processor's own state.
--
-- Why: docs/decisions/0001-snapshot-ordered-reading.md. Runs in one transaction: CREATE TRIGGER on
-- jobs_variants holds its lock until commit, so no change is missed or captured twice by the backfill.

-- The application's tables. Existing ones keep their names, columns and data.
CREATE TABLE IF NOT EXISTS jobs (
    job_id       uuid PRIMARY KEY,
    status       text,
    current_step text,
    updated_at   timestamptz
);

CREATE TABLE IF NOT EXISTS jobs_variants (
    job_variants_id uuid PRIMARY KEY,
    job_id          uuid REFERENCES jobs,
    status          text,
    current_step    text,
    updated_at      timestamptz
);

-- The fold looks up all variants of a job; legacy tables may lack this index. A btree index of the
-- application's that leads with job_id serves as well, and is used instead of a second one.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT FROM pg_index
        WHERE indrelid = 'jobs_variants'::regclass
          AND indkey[0] = (SELECT attnum FROM pg_attribute WHERE attrelid = 'jobs_variants'::regclass AND attname = 'job_id')
          AND indpred IS NULL AND indisvalid
          AND (SELECT relam FROM pg_class WHERE oid = indexrelid) = (SELECT oid FROM pg_am WHERE amname = 'btree')
    ) THEN
        CREATE INDEX outbox_jobs_variants_job_id_idx ON jobs_variants (job_id);
    END IF;
END
$$;

-- The outbox. Append-only on the hot path.
-- txid is the writing transaction's id: the processor applies the events of the transactions that
-- committed between two snapshots (docs/design.md: "Ordering"), so an event whose transaction commits late
-- is applied with the snapshot that first sees it, never skipped.
CREATE TABLE outbox_events (
    event_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txid            xid8 NOT NULL DEFAULT pg_current_xact_id(),
    partition       integer NOT NULL DEFAULT 0,
    event_type      text NOT NULL,
    schema_version  integer NOT NULL,
    job_id          uuid,
    variant_id      uuid,
    variant_version bigint,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX outbox_events_position_idx ON outbox_events (partition, txid, event_id);

-- Per-variant versions. Taken in the capture trigger, which runs while the writer holds the
-- variant's row lock: a later change of the same variant must wait for that lock, so it takes a
-- higher number. Versions of one variant therefore increase in the order its changes commit,
-- also across a delete and a re-insert of the same id.
CREATE SEQUENCE outbox_variant_versions AS bigint;

-- The partition of a job's events. One partition for now; partitioned scale-out replaces this
-- function (a stable hash of job_id), so every writer path picks it up at once.
CREATE FUNCTION outbox_partition_of(p_job_id uuid) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 0 $$;

-- The one place that shapes a variant event, for the trigger and the adoption backfill.
-- The payload is outbox.events.VariantChanged or VariantRemoved (schema version 1).
CREATE FUNCTION outbox_append_variant_event(
    p_event_type text, p_job_id uuid, p_variant_id uuid, p_status text, p_step text
) RETURNS void
LANGUAGE sql
AS $$
    INSERT INTO outbox_events (event_type, schema_version, partition, job_id, variant_id, variant_version, payload)
    VALUES (
        p_event_type, 1, outbox_partition_of(p_job_id), p_job_id, p_variant_id,
        nextval('outbox_variant_versions'),
        CASE WHEN p_event_type = 'variant_changed'
             THEN jsonb_build_object('status', p_status, 'step', p_step)
             ELSE '{}'::jsonb END
    )
$$;

-- Capture: each INSERT, DELETE and UPDATE of a variant's status, step, job or id appends an event
-- in the writer's transaction (AFTER ROW: the row as finally written).
CREATE FUNCTION outbox_capture_variant_change() RETURNS trigger
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
    -- The variant leaves its job: deleted, given another id, or detached (job_id set to NULL).
    IF TG_OP = 'DELETE'
       OR (TG_OP = 'UPDATE' AND (OLD.job_variants_id IS DISTINCT FROM NEW.job_variants_id
                                 OR NEW.job_id IS NULL)) THEN
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

CREATE TRIGGER outbox_capture_variant_insert_delete
    AFTER INSERT OR DELETE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION outbox_capture_variant_change();

-- WHEN keeps updates that change nothing the processor folds (updated_at, other columns) free.
CREATE TRIGGER outbox_capture_variant_update
    AFTER UPDATE ON jobs_variants
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.current_step IS DISTINCT FROM NEW.current_step
          OR OLD.job_id IS DISTINCT FROM NEW.job_id
          OR OLD.job_variants_id IS DISTINCT FROM NEW.job_variants_id)
    EXECUTE FUNCTION outbox_capture_variant_change();

-- Adoption: one event per existing variant, carrying its current state, so the processor's first
-- run computes every existing job (stuck ones included) from its variants. A variant whose status
-- the trigger would refuse becomes a dead letter and flags its job; it is not dropped silently.
SELECT outbox_append_variant_event('variant_changed', job_id, job_variants_id, status::text, current_step::text)
FROM jobs_variants
WHERE job_id IS NOT NULL
ORDER BY job_id, job_variants_id;

-- The processor's position, one row per partition, written with the job state it covers.
CREATE TABLE outbox_checkpoints (
    partition       integer PRIMARY KEY,
    done_snapshot   pg_snapshot NOT NULL DEFAULT '1:1:',
    target_snapshot pg_snapshot,
    last_txid       xid8 NOT NULL DEFAULT '0',
    last_event_id   bigint NOT NULL DEFAULT 0,
    events_applied  bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz
);

INSERT INTO outbox_checkpoints (partition) VALUES (0);

-- Jobs touched by a catch-up that spans several batches. Their state is written once the whole
-- catch-up is applied, so that every job state the processor writes is the fold of its variants
-- as of one committed snapshot, never a mix that no transaction ever saw.
CREATE TABLE outbox_dirty_jobs (
    partition integer NOT NULL,
    job_id    uuid NOT NULL,
    PRIMARY KEY (partition, job_id)
);

-- Jobs whose state cannot be computed (a variant at a step missing from OUTBOX_PIPELINE_STEPS, or
-- whose last event was unusable). Their state in jobs is left as it was rather than guessed.
CREATE TABLE outbox_job_flags (
    job_id     uuid PRIMARY KEY,
    reason     text NOT NULL,
    flagged_at timestamptz NOT NULL DEFAULT now()
);

-- The newest state of each variant, as folded from events; removed is a tombstone.
CREATE TABLE outbox_variant_states (
    variant_id uuid PRIMARY KEY,
    job_id     uuid NOT NULL,
    version    bigint NOT NULL,
    status     text,
    step       text,
    removed    boolean NOT NULL DEFAULT false,
    problem    text,
    event_id   bigint NOT NULL
) WITH (fillfactor = 80);

CREATE INDEX outbox_variant_states_job_id_idx ON outbox_variant_states (job_id);

-- Events that cannot be applied, parked with the reason in the transaction that moves the
-- checkpoint past them, so later events keep flowing and nothing is lost.
CREATE TABLE outbox_dead_letters (
    event_id   bigint PRIMARY KEY,
    partition  integer NOT NULL,
    job_id     uuid,
    variant_id uuid,
    reason     text NOT NULL,
    parked_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX outbox_dead_letters_job_id_idx ON outbox_dead_letters (job_id);
