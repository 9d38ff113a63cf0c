"""Retention by segments under load: nothing unapplied or unacknowledged is ever dropped.

Two `outbox run` workers with OUTBOX_RETENTION=0s (one of them elected to run the rounds, every
second) and a subscriber run while writers write. Audit triggers watch from inside the database:
every event and transition ever written is recorded, and a BEFORE TRUNCATE trigger on each segment
(an event trigger adds it to every segment retention creates) records, inside the truncating
transaction, each row the truncate removes and whether it was applied (visible in its partition's
done snapshot) or acknowledged (at or below every subscription's position). A REPEATABLE READ
session holds its snapshot open all along: segments are truncated anyway and take no space once
truncated. Then a session that has read the outbox keeps its transaction open: retention gives the
segment up for that round (lock timeout) and writers go on.

At the end: each event applied exactly once (fleet.check_audit), job state equal to the reference,
every truncated event applied and every truncated transition acknowledged when it went, every event
and transition written either still there or truncated, the subscriber saw each transition exactly
once, and a replay from the baseline and what is left gives the state live processing gave.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections import Counter
from typing import Any

import psycopg

import outbox
from processor import subscriptions
from processor.database import connect
from processor.replay import replay
from processor.store import job_ids_all
from processor.workload import ChurnWriters
from tests.helpers import make_jobs, pending_work, wait_for, write_jobs_behind_the_processor
from tests.reference import actual_job_states, reference_job_states
from tests.reliability.fleet import (
    STEPS,
    check_audit,
    check_final_state,
    fleet,
    install_audits,
    repartition_now,
    stop_cleanly,
    worker_env,
)

__all__ = ["fleet"]  # the fixture

# Inside each truncate: the rows removed, and whether each might go. Every segment gets the trigger,
# those that exist now and those retention creates later (an event trigger on CREATE TABLE).
TRUNCATE_AUDIT = """
CREATE TABLE audit_truncated (
    relation text, id bigint, may_go boolean, pid integer DEFAULT pg_backend_pid(),
    application_name text DEFAULT current_setting('application_name'), at timestamptz DEFAULT clock_timestamp()
);
CREATE TABLE audit_transitions (transition_id bigint PRIMARY KEY);
CREATE TABLE audit_rotations (segment smallint);
CREATE FUNCTION audit_rotation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_rotations VALUES (NEW.segment);
    RETURN NULL;
END $$;
CREATE TRIGGER audit_rotation AFTER UPDATE ON outbox_segments FOR EACH ROW
    WHEN (NEW.relation = 'outbox_events' AND NEW.opened_at IS NOT NULL AND NEW.closed_at IS NULL)
    EXECUTE FUNCTION audit_rotation();
CREATE FUNCTION audit_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_transitions VALUES (NEW.transition_id);
    RETURN NULL;
END $$;
CREATE TRIGGER audit_transition AFTER INSERT ON outbox_job_transitions FOR EACH ROW EXECUTE FUNCTION audit_transition();
CREATE FUNCTION audit_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME LIKE 'outbox_events_s%' THEN
        EXECUTE format(
            'INSERT INTO audit_truncated (relation, id, may_go) '
            'SELECT ''events'', e.event_id, coalesce(pg_visible_in_snapshot(e.txid, c.done_snapshot), false) '
            'FROM %I AS e LEFT JOIN outbox_checkpoints AS c USING (partition)', TG_TABLE_NAME);
    ELSE
        EXECUTE format(
            'INSERT INTO audit_truncated (relation, id, may_go) '
            'SELECT ''transitions'', t.transition_id, '
            '       t.transition_id <= (SELECT coalesce(min(position), 0) FROM outbox_subscriptions) '
            'FROM %I AS t', TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END $$;
CREATE FUNCTION audit_segment_created() RETURNS event_trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT object_identity FROM pg_event_trigger_ddl_commands()
             WHERE command_tag = 'CREATE TABLE' AND object_identity ~ '^public\\.outbox_(events|job_transitions)_s\\d+$'
    LOOP
        EXECUTE format('CREATE TRIGGER audit_truncate BEFORE TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION audit_truncate()', r.object_identity);
    END LOOP;
END $$;
CREATE EVENT TRIGGER audit_segment_created ON ddl_command_end WHEN TAG IN ('CREATE TABLE')
    EXECUTE FUNCTION audit_segment_created();
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT relation, segment FROM outbox_segments LOOP
        EXECUTE format('CREATE TRIGGER audit_truncate BEFORE TRUNCATE ON %I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION audit_truncate()', r.relation || '_s' || r.segment);
    END LOOP;
END $$;
"""


def _truncated(conn: psycopg.Connection[Any], relation: str) -> list[tuple[int, bool]]:
    return conn.execute("SELECT id, may_go FROM audit_truncated WHERE relation = %s", [relation]).fetchall()


def _segment_bytes(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """The on-disk size (heap and indexes) of every free segment."""
    rows = conn.execute(
        "SELECT s.relation || '_s' || s.segment, pg_total_relation_size((s.relation || '_s' || s.segment)::regclass)"
        " FROM outbox_segments AS s WHERE s.opened_at IS NULL"
    ).fetchall()
    return dict(rows)


def test_retention_under_writers_workers_and_a_subscriber_drops_only_what_was_applied_and_acknowledged(
    db, conn, engine, fleet, capsys
):
    install_audits(conn)
    conn.execute(TRUNCATE_AUDIT)
    repartition_now(db, 2)
    url = db.url.render_as_string(hide_password=False)
    with connect(db, application_name="outbox-tests") as op:
        subscriptions.create(op, "audit", from_start=True, to_statuses=None)
    seen: Counter[int] = Counter()
    subscriber = outbox.Subscriber("audit", url, lambda _conn, t: seen.update([t.transition_id]), batch_size=50)
    subscribing = threading.Thread(target=subscriber.run, name="subscriber", daemon=True)
    subscribing.start()

    # A snapshot held from the start to the end, by a session that never reads the outbox.
    held = connect(db, application_name="outbox-tests-held", autocommit=False)
    try:
        _run_and_check(db, conn, engine, fleet, capsys, subscriber, subscribing, seen, held)
    finally:
        held.close()


def _run_and_check(db, conn, engine, fleet, capsys, subscriber, subscribing, seen, held) -> None:
    held.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    held.execute("SELECT count(*) FROM jobs").fetchone()

    jobs = make_jobs(engine, 60, random.Random(18))
    env = worker_env(db, OUTBOX_PARTITIONS="2", OUTBOX_BATCH_SIZE="50", OUTBOX_RETENTION="0s")
    workers = [fleet(env, f"worker-{i}") for i in range(2)]
    try:
        with ChurnWriters(db, engine, jobs, seed=18, pause=0.002) as writers:
            wait_for(lambda: len(_truncated(conn, "events")) >= 3000, timeout=120, what="retention to truncate events")
            # A session that read the outbox and stays in its transaction: retention waits for it
            # (its lock timeout), gives the segment up for the round, and writers go on.
            with connect(db, application_name="outbox-tests-reader", autocommit=False) as reader:
                reader.execute("SELECT count(*) FROM outbox_events").fetchone()
                truncated_before = len(_truncated(conn, "events"))
                mark, opened = writers.counts["committed"], _rotations(conn)
                # Rounds go on (each closes the current segment): they leave the held segments alone.
                wait_for(lambda: _rotations(conn) >= opened + 3, timeout=30, what="retention rounds")
                wait_for(lambda: writers.counts["committed"] > mark + 100, timeout=30, what="writers to go on")
                assert len(_truncated(conn, "events")) == truncated_before
                reader.rollback()
            wait_for(
                lambda: len(_truncated(conn, "events")) > truncated_before,
                timeout=60,
                what="retention to go on once the reader ended",
            )
            writers.stop()
        writers.check()
        wait_for(lambda: pending_work(conn) == 0, timeout=120, what="the workers to drain")
        wait_for(lambda: not _unacknowledged(conn), timeout=60, what="the subscriber to acknowledge everything")
    finally:
        subscriber.stop()
        subscribing.join(timeout=30)
        for worker in workers:
            stop_cleanly(worker)

    # The workers' rounds: by the elected worker's retention connection, one session at a time (when the
    # workers stop, the election passes to the one still running, which may do a round of its own).
    by = conn.execute(
        "SELECT pid, min(application_name), min(at), max(at) FROM audit_truncated GROUP BY pid ORDER BY min(at)"
    ).fetchall()
    assert by and all(name.startswith("outbox-retention") for _, name, _, _ in by), by
    assert all(earlier[3] < later[2] for earlier, later in itertools.pairwise(by)), f"two sessions at once: {by}"

    # One more round by hand, the held snapshot still open: every closed segment goes, and takes no space.
    from processor.retention import parse_duration, retain

    final = retain(conn, parse_duration("0s"))
    final = retain(conn, parse_duration("0s"))  # the segment the first round closed
    assert not final.kept(), final.kept()
    free_bytes = _segment_bytes(conn)
    # An empty heap and its empty indexes: a few pages each, whatever the segment held before.
    assert free_bytes and all(size <= 5 * 8192 for size in free_bytes.values()), free_bytes
    held.rollback()

    check_final_state(conn, 2)
    report = check_audit(conn)
    events = _truncated(conn, "events")
    transitions = _truncated(conn, "transitions")
    assert events and all(may_go for _, may_go in events), [e for e in events if not e[1]][:5]
    assert transitions and all(may_go for _, may_go in transitions), [t for t in transitions if not t[1]][:5]
    lost_events = conn.execute(
        "SELECT a.event_id FROM audit_events AS a"
        " WHERE NOT EXISTS (SELECT FROM outbox_events AS e WHERE e.event_id = a.event_id)"
        "   AND NOT EXISTS (SELECT FROM audit_truncated AS t WHERE t.relation = 'events' AND t.id = a.event_id)"
    ).fetchall()
    assert not lost_events
    assert len({i for i, _ in events}) == len(events), "an event truncated twice"
    written = [row[0] for row in conn.execute("SELECT transition_id FROM audit_transitions ORDER BY 1")]
    assert written and sorted(seen) == written and set(seen.values()) == {1}, "each transition handled once"

    # Replay from the baseline and what is left gives what live processing gave.
    expected = actual_job_states(conn)
    assert expected == reference_job_states(conn, STEPS)
    write_jobs_behind_the_processor(conn, "UPDATE jobs SET status = NULL, current_step = NULL")
    replay(conn, job_ids_all(conn, None), dry_run=False)
    assert actual_job_states(conn) == expected
    with capsys.disabled():
        print(
            f"\nretention under load: {writers.summary()}; {len(events)} events and {len(transitions)} transitions "
            f"truncated, every one applied/acknowledged; free segments {free_bytes} bytes with a snapshot held; "
            f"audit: {report}"
        )


def _rotations(conn: psycopg.Connection[Any]) -> int:
    """How many times writers moved to another segment of the events (the audit counts them)."""
    row = conn.execute("SELECT count(*) FROM audit_rotations").fetchone()
    assert row is not None
    return int(row[0])


def _unacknowledged(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT FROM outbox_job_transitions WHERE transition_id > "
        "(SELECT min(position) FROM outbox_subscriptions))"
    ).fetchone()
    assert row is not None
    return bool(row[0])
