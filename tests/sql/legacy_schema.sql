-- The system this product replaces: the application's tables and the aggregation trigger that
-- set job state from variant counts (and lost updates under concurrent commits).
CREATE TABLE jobs (
    job_id       uuid PRIMARY KEY,
    status       text,
    current_step text,
    updated_at   timestamptz
);

CREATE TABLE jobs_variants (
    job_variants_id uuid PRIMARY KEY,
    job_id          uuid REFERENCES jobs,
    status          text,
    current_step    text,
    updated_at      timestamptz
);

CREATE FUNCTION check_all_variants_done() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    total integer;
    finished integer;
BEGIN
    -- Under READ COMMITTED this count cannot see other transactions' uncommitted changes.
    SELECT count(*), count(*) FILTER (WHERE status = 'done')
    INTO total, finished
    FROM jobs_variants
    WHERE job_id = NEW.job_id;

    IF total = finished THEN
        UPDATE jobs SET status = 'done', current_step = NEW.current_step, updated_at = now()
        WHERE job_id = NEW.job_id;
    ELSE
        UPDATE jobs SET status = 'running', current_step = NEW.current_step, updated_at = now()
        WHERE job_id = NEW.job_id;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER check_all_variants_done_trigger
    AFTER UPDATE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION check_all_variants_done();
