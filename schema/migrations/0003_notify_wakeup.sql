-- 0003: an optional NOTIFY wake-up for the worker (OUTBOX_WAKEUP=notify): functions only; the
-- trigger exists once an operator runs `outbox migrate --wakeup notify`.
--
-- Why: docs/decisions/0011-notify-wakeup-is-optional.md.

-- One notification per writing transaction: the channel and the (empty) payload never change, and
-- PostgreSQL folds identical notifications of one transaction into one. It is delivered when the
-- writer commits, once its events are visible; a transaction that rolls back sends nothing.
CREATE FUNCTION outbox_wakeup_notify() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('outbox_wakeup', '');
    RETURN NULL;
END
$$;

-- Statement-level, so a statement that changes many variants notifies once. It also fires for an
-- UPDATE that captures nothing (it changed no folded column, or no row): the worker then wakes for
-- an empty poll, which is harmless.
CREATE FUNCTION outbox_wakeup_enable() RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    CREATE OR REPLACE TRIGGER outbox_wakeup_notify
        AFTER INSERT OR UPDATE OR DELETE ON jobs_variants
        FOR EACH STATEMENT EXECUTE FUNCTION outbox_wakeup_notify();
END
$$;

CREATE FUNCTION outbox_wakeup_disable() RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    DROP TRIGGER IF EXISTS outbox_wakeup_notify ON jobs_variants;
END
$$;
