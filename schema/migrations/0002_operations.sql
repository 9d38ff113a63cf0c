-- 0002: what operating the processor needs: throughput history for `backlog`, the last event
-- applied, the replay baseline kept by `prune`, discarded dead letters, the variant_id index, the
-- applied-event test and a payload-size CHECK (dropped by 0007).

-- Events applied per partition in 10-second buckets (one small upsert per batch), for the recent
-- throughput that `outbox backlog` shows. `outbox prune` drops buckets older than a day.
CREATE TABLE outbox_throughput (
    partition integer NOT NULL,
    bucket    timestamptz NOT NULL,
    events    bigint NOT NULL,
    PRIMARY KEY (partition, bucket)
);

ALTER TABLE outbox_checkpoints
    ADD COLUMN last_applied_event_id bigint,
    ADD COLUMN last_applied_at timestamptz,
    -- The cluster (pg_control_system().system_identifier) whose transaction ids the snapshots
    -- refer to; a restore into another cluster is detected by a change (processor/rebase.py).
    ADD COLUMN cluster_id bigint,
    ADD COLUMN rebase_pending boolean NOT NULL DEFAULT false;

-- The fold of the events that `outbox prune` removed: per variant, the latest state they gave.
-- Replay starts from here, then applies the events that remain, so a replay after pruning gives
-- the same state as one before.
CREATE TABLE outbox_variant_baseline (LIKE outbox_variant_states INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE outbox_variant_baseline ADD PRIMARY KEY (variant_id);

CREATE INDEX outbox_variant_baseline_job_id_idx ON outbox_variant_baseline (job_id);

-- `outbox dead-letters discard` keeps the record but marks the event as ignored: replay skips it.
ALTER TABLE outbox_dead_letters ADD COLUMN discarded_at timestamptz;

-- Replay reads the events of given variants (found through the variant states, the baseline and
-- jobs_variants). One index, not two (job and variant): each costs every writer an insert.
CREATE INDEX outbox_events_variant_id_idx ON outbox_events (variant_id);

-- Whether an event is applied, given a checkpoint's cursor (processor/snapshot.py): its
-- transaction is visible in the done snapshot, or it is among the events of the catch-up in
-- progress already applied. A single-expression SQL function, so the planner inlines it.
CREATE FUNCTION outbox_event_applied(
    p_txid xid8, p_event_id bigint,
    p_done pg_snapshot, p_target pg_snapshot, p_after_txid xid8, p_after_event_id bigint
) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT pg_visible_in_snapshot(p_txid, p_done)
           OR (p_target IS NOT NULL
               AND pg_visible_in_snapshot(p_txid, p_target)
               AND (p_txid, p_event_id) <= (p_after_txid, p_after_event_id))
$$;

-- A size cap on event payloads, checked at write time with a clear error: the product's own
-- payloads are a few dozen bytes; anything near this is a bug or an attack.
ALTER TABLE outbox_events
    ADD CONSTRAINT outbox_events_payload_size CHECK (pg_column_size(payload) <= 65536);
