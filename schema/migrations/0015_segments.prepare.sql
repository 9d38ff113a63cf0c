-- 0015, before its transaction: the steps that would otherwise hold the writers back for as long as
-- they read or index the whole outbox. `outbox migrate` runs them one at a time, each in its own
-- transaction (CREATE INDEX CONCURRENTLY in none), while writers keep writing, and only while 0015 is
-- pending. Each is safe to run again, and to run on a database where the table is already a
-- partitioned one (then it does nothing). What 0015 then does under the writers' lock reads no row:
-- the new column has a constant default (no rewrite), the CHECK is already valid (ATTACH skips its
-- scan) and the new primary key's index exists.
--
-- Steps are separated by "-- step:" lines; they run only when the "-- when:" query (one, before the
-- first step) returns true.

-- when: the events are not partitioned yet (run again on a migrated database, nothing to prepare)
SELECT relkind = 'r' FROM pg_class WHERE oid = 'outbox_events'::regclass

-- step: the segment column of the events (a constant default: a catalog change, no rewrite)
ALTER TABLE outbox_events ADD COLUMN IF NOT EXISTS segment smallint NOT NULL DEFAULT 0

-- step: every existing event is in segment 0 (added without reading the table)
DO $$
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'outbox_events'::regclass) = 'r'
       AND NOT EXISTS (SELECT FROM pg_constraint
                       WHERE conrelid = 'outbox_events'::regclass AND conname = 'outbox_events_s0_segment') THEN
        ALTER TABLE outbox_events ADD CONSTRAINT outbox_events_s0_segment CHECK (segment = 0) NOT VALID;
    END IF;
END
$$

-- step: checked while writers write (SHARE UPDATE EXCLUSIVE: it does not wait for them, nor they for it)
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_constraint
               WHERE conrelid = 'outbox_events'::regclass AND conname = 'outbox_events_s0_segment' AND NOT convalidated) THEN
        ALTER TABLE outbox_events VALIDATE CONSTRAINT outbox_events_s0_segment;
    END IF;
END
$$

-- step: an index a failed build left invalid is dropped, to be built again
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_index WHERE indexrelid = to_regclass('outbox_events_s0_pkey_new') AND NOT indisvalid) THEN
        DROP INDEX outbox_events_s0_pkey_new;
    END IF;
END
$$

-- step: the index of the partitioned table's primary key, built without blocking writers
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS outbox_events_s0_pkey_new ON outbox_events (event_id, segment)

-- step: the segment column of the transitions
ALTER TABLE outbox_job_transitions ADD COLUMN IF NOT EXISTS segment smallint NOT NULL DEFAULT 0

-- step: every existing transition is in segment 0
DO $$
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'outbox_job_transitions'::regclass) = 'r'
       AND NOT EXISTS (SELECT FROM pg_constraint
                       WHERE conrelid = 'outbox_job_transitions'::regclass
                         AND conname = 'outbox_job_transitions_s0_segment') THEN
        ALTER TABLE outbox_job_transitions
            ADD CONSTRAINT outbox_job_transitions_s0_segment CHECK (segment = 0) NOT VALID;
    END IF;
END
$$

-- step: checked while the workers write
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_constraint
               WHERE conrelid = 'outbox_job_transitions'::regclass AND conname = 'outbox_job_transitions_s0_segment'
                 AND NOT convalidated) THEN
        ALTER TABLE outbox_job_transitions VALIDATE CONSTRAINT outbox_job_transitions_s0_segment;
    END IF;
END
$$

-- step: an index a failed build left invalid is dropped, to be built again
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_index WHERE indexrelid = to_regclass('outbox_job_transitions_s0_pkey_new') AND NOT indisvalid) THEN
        DROP INDEX outbox_job_transitions_s0_pkey_new;
    END IF;
END
$$

-- step: the index of the transitions' new primary key
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS outbox_job_transitions_s0_pkey_new
    ON outbox_job_transitions (transition_id, segment)
