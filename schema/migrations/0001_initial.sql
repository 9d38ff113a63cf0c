-- 0001: the application's tables (created when missing, adopted when present), the outbox,
-- the capture trigger, and the processor's own state.
--
-- Runs inside one transaction (processor/migrate.py). ALTER TABLE on jobs_variants takes an
-- ACCESS EXCLUSIVE lock until commit, so no writer can change a variant between the backfill below
-- and the creation of the capture trigger: no change is missed during adoption.

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

-- Per-variant version, assigned under the variant's row lock by the writer's own UPDATE, so the
-- versions of one variant increase in the order its changes commit. A constant default adds the
-- column without rewriting the table.
ALTER TABLE jobs_variants ADD COLUMN IF NOT EXISTS outbox_version bigint NOT NULL DEFAULT 0;

-- The fold looks up all variants of a job; legacy tables may lack this index.
CREATE INDEX IF NOT EXISTS outbox_jobs_variants_job_id_idx ON jobs_variants (job_id);

-- The outbox. Append-only on the hot path.
-- txid is the writing transaction's id. The processor reads in (txid, event_id) order and only
-- below the oldest running transaction id (pg_snapshot_xmin), so an event whose transaction commits
-- late can never fall behind the processor's checkpoint (README: "Ordering").
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

-- The partition of a job's events. One partition for now; partitioned scale-out replaces this
-- function (a stable hash of job_id), so every writer path picks it up at once.
CREATE FUNCTION outbox_partition_of(p_job_id uuid) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 0 $$;

-- Refuse at write time what the processor could never fold, so nothing wrong is ever recorded.
CREATE FUNCTION outbox_check_variant_status(p_status text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('queued', 'running', 'done', 'failed') THEN
        RAISE EXCEPTION 'jobs_variants.status must be one of queued, running, done, failed (got %)',
            coalesce(quote_literal(p_status), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
END
$$;

-- The one place that shapes a variant event, for the trigger, the backfill and the Python API.
-- The payload is outbox.events.VariantChanged (schema version 1).
CREATE FUNCTION outbox_append_variant_event(
    p_event_type text, p_job_id uuid, p_variant_id uuid, p_version bigint, p_status text, p_step text
) RETURNS bigint
LANGUAGE sql
AS $$
    INSERT INTO outbox_events (event_type, schema_version, partition, job_id, variant_id, variant_version, payload)
    VALUES (
        p_event_type, 1, outbox_partition_of(p_job_id), p_job_id, p_variant_id, p_version,
        CASE WHEN p_event_type = 'variant_changed'
             THEN jsonb_build_object('status', p_status, 'step', p_step)
             ELSE '{}'::jsonb END
    )
    RETURNING event_id
$$;

-- Capture for unchanged writers: plain INSERT / UPDATE / DELETE on jobs_variants append an event in
-- the writer's own transaction. It never reads other variants and never writes jobs: the processor
-- alone computes job state, serially, so concurrent commits cannot hide each other's changes.
--
-- A BEFORE trigger, because the version must be stored in the row being written. A writer that
-- bumps outbox_version itself (outbox.update_variant, outbox.create_job) appends its own event, and
-- the trigger leaves it alone.
CREATE FUNCTION outbox_capture_variant_change() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM outbox_append_variant_event(
            'variant_removed', OLD.job_id, OLD.job_variants_id, OLD.outbox_version + 1, NULL, NULL);
        RETURN OLD;
    END IF;

    IF TG_OP = 'UPDATE' THEN
        IF NEW.outbox_version IS DISTINCT FROM OLD.outbox_version THEN
            RETURN NEW;  -- the writer versioned this change and wrote its event itself
        END IF;
        IF NEW.status IS NOT DISTINCT FROM OLD.status
           AND NEW.current_step IS NOT DISTINCT FROM OLD.current_step
           AND NEW.job_id IS NOT DISTINCT FROM OLD.job_id THEN
            RETURN NEW;  -- nothing the processor folds has changed
        END IF;
        NEW.outbox_version := OLD.outbox_version + 1;
    ELSE  -- INSERT
        IF NEW.outbox_version <> 0 THEN
            RETURN NEW;  -- versioned by the writer, which wrote its event itself
        END IF;
        NEW.outbox_version := 1;
    END IF;

    PERFORM outbox_check_variant_status(NEW.status);
    PERFORM outbox_append_variant_event(
        'variant_changed', NEW.job_id, NEW.job_variants_id, NEW.outbox_version, NEW.status, NEW.current_step);
    RETURN NEW;
END
$$;

CREATE TRIGGER outbox_capture_variant_change
    BEFORE INSERT OR UPDATE OR DELETE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION outbox_capture_variant_change();

-- Adoption: one event per existing variant, carrying its current state, so the processor's first
-- run computes every existing job (stuck ones included) from its variants.
SELECT outbox_append_variant_event(
           'variant_changed', job_id, job_variants_id, outbox_version, status, current_step)
FROM jobs_variants
ORDER BY job_id, job_variants_id;

-- The processor's position, one row per partition, written in the same transaction as the job
-- state it covers: that is what makes each event take effect exactly once.
CREATE TABLE outbox_checkpoints (
    partition      integer PRIMARY KEY,
    last_txid      xid8 NOT NULL DEFAULT '0',
    last_event_id  bigint NOT NULL DEFAULT 0,
    events_applied bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz
);

INSERT INTO outbox_checkpoints (partition) VALUES (0);

-- The latest state of each variant, as folded from events (latest by version, so a duplicate or a
-- stale event changes nothing). removed marks a deleted variant: kept as a tombstone so that an
-- older change processed after the delete cannot bring it back.
-- Updates never touch an indexed column, so with free space on the page they stay HOT.
CREATE TABLE outbox_variant_states (
    variant_id uuid PRIMARY KEY,
    job_id     uuid NOT NULL,
    version    bigint NOT NULL,
    status     text,
    step       text,
    removed    boolean NOT NULL DEFAULT false,
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
