"""Operations: backlog, replay, verify and repair, dead letters, prune."""

from __future__ import annotations

import datetime as dt
import random
import threading
import uuid

import outbox
from processor import workload
from processor.backlog import TopJob, collect_backlog
from processor.database import connect
from processor.dead_letters import discard, list_dead_letters, retry
from processor.replay import replay
from processor.retention import parse_duration, retain
from processor.store import Segmented, job_ids_all
from processor.verify import repair, verify
from processor.worker import Worker
from tests.helpers import drain, job_state, make_jobs, write_jobs_behind_the_processor
from tests.reference import actual_job_states, reference_job_states

STEPS = ("ingest", "detect", "segment", "iou_eval")


def random_moves(conn, jobs, rng: random.Random, count: int) -> int:
    """``count`` random plain-SQL updates of the variants of ``jobs``."""
    return workload.random_updates(conn, [v for vs in jobs.values() for v in vs], rng, count)


def move(conn, variant, status: str, step: str) -> None:
    workload.write_variant(conn, variant, status, step, plain_sql=True)


def test_backlog_counts_exactly_what_was_written_and_drops_to_zero(conn, engine, settings):
    rng = random.Random(1)
    jobs = make_jobs(engine, 12, rng)
    created = sum(len(v) for v in jobs.values())  # one event per variant created
    started = conn.execute("UPDATE jobs_variants SET status = 'running', current_step = 'ingest'").rowcount
    top_job = max(jobs, key=lambda j: len(jobs[j]))
    conn.execute("UPDATE jobs_variants SET current_step = 'detect' WHERE job_id = %s", [top_job])

    report = collect_backlog(conn, 0)
    assert report.pending_events == created + started + len(jobs[top_job])
    assert report.pending_top_jobs[0] == TopJob(top_job, pending_events=3 * len(jobs[top_job]))
    assert report.pending_by_event_type == {"variant_changed": report.pending_events}
    assert report.oldest_pending_age_seconds is not None and report.oldest_pending_age_seconds >= 0
    assert report.consumer is None and report.standbys == 0
    assert report.blocking_transactions == ()

    # An open transaction's events are not pending (not committed) and hold nothing back.
    with connect(settings.database(), application_name="open", autocommit=False) as open_tx:
        move(open_tx, jobs[top_job][0], "running", "segment")
        drain(settings)
        after = collect_backlog(conn, 0)
        assert after.pending_events == 0
        assert after.checkpoint.events_applied == report.pending_events
        assert after.checkpoint.last_event_id is not None
        open_tx.commit()
    assert collect_backlog(conn, 0).pending_events == 1
    drain(settings)
    assert collect_backlog(conn, 0).pending_events == 0


def test_replay_restores_corrupted_jobs_and_dry_run_changes_nothing(conn, engine, settings):
    rng = random.Random(2)
    jobs = make_jobs(engine, 20, rng)
    random_moves(conn, jobs, rng, 60)
    drain(settings)
    good = actual_job_states(conn)
    assert good == reference_job_states(conn, STEPS)

    write_jobs_behind_the_processor(conn, "UPDATE jobs SET status = 'running', current_step = 'ingest'")
    conn.execute(
        "DELETE FROM outbox_variant_states WHERE variant_id IN (SELECT variant_id FROM outbox_variant_states LIMIT 5)"
    )
    corrupted = actual_job_states(conn)
    all_jobs = job_ids_all(conn, 0)

    preview = replay(conn, all_jobs, dry_run=True)
    assert actual_job_states(conn) == corrupted
    assert {c.job_id for c in preview} == {j for j in good if good[j] != corrupted[j]}

    changes = replay(conn, all_jobs, dry_run=False, chunk_size=7)
    assert actual_job_states(conn) == good
    assert {c.job_id for c in changes} == {c.job_id for c in preview}


def test_replay_during_live_processing_under_concurrent_writers_equals_the_reference(db, conn, engine, settings):
    rng = random.Random(3)
    jobs = make_jobs(engine, 60, rng)
    applied: list[int] = []
    worker = Worker(settings, db, on_batch=lambda result: applied.extend(result.event_ids))
    worker_thread = threading.Thread(target=worker.run)
    worker_thread.start()
    stop = threading.Event()
    errors: list[BaseException] = []

    def replayer() -> None:
        try:
            with connect(db, application_name="replayer") as rconn:
                while not stop.is_set():
                    replay(rconn, job_ids_all(rconn, 0), dry_run=False, chunk_size=13)
        except BaseException as exc:
            errors.append(exc)

    variants = [v for vs in jobs.values() for v in vs]
    replay_thread = threading.Thread(target=replayer)
    replay_thread.start()
    with workload.UpdateWriters(db, variants, writers=4, seed=rng.random(), updates=400) as writers:
        writers.join()
    errors.extend(writers.errors)
    workload.finish_jobs(conn, list(jobs)[:20])
    stop.set()
    replay_thread.join()
    worker.stop()
    worker_thread.join()
    assert not errors, errors[0]
    drain(settings)

    assert actual_job_states(conn) == reference_job_states(conn, STEPS)
    all_ids = [row[0] for row in conn.execute("SELECT event_id FROM outbox_events")]
    drained_rest = conn.execute("SELECT events_applied FROM outbox_checkpoints").fetchone()[0] - len(applied)
    assert len(set(applied)) == len(applied) and len(applied) + drained_rest == len(all_ids)
    assert verify(conn).drift is False


def test_verify_reports_drift_and_repair_restores_through_the_processor(conn, engine, settings):
    rng = random.Random(4)
    jobs = make_jobs(engine, 10, rng)
    workload.finish_jobs(conn, list(jobs)[:5])
    random_moves(conn, {j: v for j, v in list(jobs.items())[5:]}, rng, 20)
    drain(settings)
    assert not verify(conn).drift

    stuck_job = next(iter(jobs))
    write_jobs_behind_the_processor(conn, "UPDATE jobs SET status = 'running' WHERE job_id = %s", [stuck_job])
    hidden_variant = jobs[list(jobs)[6]][0]
    conn.execute("ALTER TABLE jobs_variants DISABLE TRIGGER USER")  # a write the outbox never saw
    move(conn, hidden_variant, "done", "iou_eval")
    conn.execute("ALTER TABLE jobs_variants ENABLE TRIGGER USER")

    report = verify(conn)
    assert report.drift
    assert [d.job_id for d in report.stuck_jobs] == [stuck_job]
    assert stuck_job in {d.job_id for d in report.job_drift}
    assert [d.variant_id for d in report.variant_drift] == [hidden_variant]

    repaired = repair(conn, report, wait=0)  # the worker is not running: the resync event waits for it
    assert repaired.resync_events == 1 and repaired.jobs_rebuilt >= 1 and repaired.not_applied == 1
    drain(settings)  # the worker applies the resync event
    assert not verify(conn).drift
    assert actual_job_states(conn) == reference_job_states(conn, STEPS)


def test_dead_letters_do_not_stop_later_events_and_retry_applies_them_once_fixed(conn, engine, settings):
    rng = random.Random(5)
    jobs = make_jobs(engine, 3, rng)
    bad_job, other_job, third_job = jobs
    bad_variant = jobs[bad_job][0]
    drain(settings)
    conn.execute(
        "INSERT INTO outbox_events (event_type, schema_version, job_id, variant_id, variant_version, payload) "
        "VALUES ('variant_changed', 1, %s, %s, nextval('outbox_variant_versions'), %s)",
        [bad_job, bad_variant, '{"status": "exploded", "step": "ingest"}'],
    )
    workload.finish_jobs(conn, [other_job])
    drain(settings)
    assert job_state(conn, other_job) == ("done", "iou_eval")  # later events kept flowing
    (letter,) = list_dead_letters(conn)
    assert letter.job_id == bad_job and "status" in letter.reason
    flagged = conn.execute("SELECT job_id FROM outbox_job_flags").fetchall()
    assert flagged == [(bad_job,)]  # the job is visibly flagged, its state left alone

    assert retry(conn, [letter.event_id])[letter.event_id].startswith("still failing")
    conn.execute(
        'UPDATE outbox_events SET payload = \'{"status": "running", "step": "detect"}\' WHERE event_id = %s',
        [letter.event_id],
    )  # the operator fixes the payload
    assert retry(conn, [letter.event_id]) == {letter.event_id: "applied"}
    assert list_dead_letters(conn) == []
    assert job_state(conn, bad_job) == ("running", "ingest")
    assert conn.execute("SELECT count(*) FROM outbox_job_flags").fetchone()[0] == 0

    # Discarding instead: the job is rebuilt without the event.
    conn.execute(
        "INSERT INTO outbox_events (event_type, schema_version, job_id, variant_id, variant_version, payload) "
        "VALUES ('mystery', 1, %s, %s, nextval('outbox_variant_versions'), '{}')",
        [third_job, jobs[third_job][0]],
    )
    drain(settings)
    (letter,) = list_dead_letters(conn)
    assert conn.execute("SELECT job_id FROM outbox_job_flags").fetchall() == [(third_job,)]
    assert discard(conn, [letter.event_id]) == {letter.event_id: "discarded"}
    assert conn.execute("SELECT count(*) FROM outbox_job_flags").fetchone()[0] == 0
    # (The bad job's events were edited by hand above, so only the others can match jobs_variants.)
    assert actual_job_states(conn)[third_job] == reference_job_states(conn, STEPS)[third_job]


def test_prune_then_replay_gives_the_same_state_as_replay_without_prune(conn, engine, settings):
    rng = random.Random(6)
    jobs = make_jobs(engine, 15, rng)
    random_moves(conn, jobs, rng, 80)
    drain(settings)
    all_jobs = job_ids_all(conn, 0)
    replay(conn, all_jobs, dry_run=False)
    expected = actual_job_states(conn)
    states_before = conn.execute("SELECT * FROM outbox_variant_states ORDER BY variant_id").fetchall()

    # Everything applied goes, segment by segment, folded into the baseline in chunks.
    events = conn.execute("SELECT count(*) FROM outbox_events").fetchone()[0]
    result = retain(conn, parse_duration("0s"), chunk_size=33)
    assert result.removed(Segmented.EVENTS) == events and not result.kept()
    assert conn.execute("SELECT count(*) FROM outbox_events").fetchone()[0] == 0

    write_jobs_behind_the_processor(conn, "UPDATE jobs SET status = NULL, current_step = NULL")
    replay(conn, all_jobs, dry_run=False)
    assert actual_job_states(conn) == expected
    assert conn.execute("SELECT * FROM outbox_variant_states ORDER BY variant_id").fetchall() == states_before

    # An unapplied event must survive any prune: its transaction still open (the segment's lock is
    # not granted), then committed but not applied (the survey finds it), with an applied one beside it.
    move(conn, jobs[all_jobs[1]][0], "running", "segment")
    drain(settings)
    with connect(settings.database(), application_name="open", autocommit=False) as open_tx:
        move(open_tx, jobs[all_jobs[0]][0], "running", "segment")
        held = retain(conn, parse_duration("0s"), lock_timeout=dt.timedelta(milliseconds=100))
        open_tx.commit()
    assert held.removed(Segmented.EVENTS) == 0
    assert [k.kept_because for k in held.kept()] == [
        "a session held it, or a checkpoint, past the lock timeout; the next round tries again"
    ]
    unapplied = retain(conn, parse_duration("0s"))
    assert unapplied.removed(Segmented.EVENTS) == 0
    assert [k.kept_because for k in unapplied.kept()] == ["1 of its events are not applied yet"]
    assert conn.execute("SELECT count(*) FROM outbox_events").fetchone()[0] == 2
    drain(settings)  # the surviving event still applies
    assert actual_job_states(conn) == reference_job_states(conn, STEPS)
    assert not retain(conn, parse_duration("0s")).kept()
    assert conn.execute("SELECT count(*) FROM outbox_events").fetchone()[0] == 0


def test_replay_of_one_job_never_writes_another_job_from_part_of_its_variants(conn, engine, settings):
    with engine.begin() as sa:
        job_a, (moving,) = outbox.create_job(sa, variants=1)
        job_b, (b_running,) = outbox.create_job(sa, variants=1)
    move(conn, moving, "done", "iou_eval")
    move(conn, b_running, "running", "segment")
    drain(settings)
    retain(conn, parse_duration("0s"))  # the baseline now says `moving` is in job A
    conn.execute("UPDATE jobs_variants SET job_id = %s WHERE job_variants_id = %s", [job_b, moving])
    drain(settings)
    assert job_state(conn, job_b) == ("running", "segment")
    replay(conn, [job_a], dry_run=False)
    assert job_state(conn, job_b) == ("running", "segment")
    assert actual_job_states(conn) == reference_job_states(conn, STEPS)


def test_an_event_that_could_never_apply_holds_its_job_until_discarded(conn, engine, settings):
    with engine.begin() as sa:
        job, (v1, v2) = outbox.create_job(sa, variants=2)
    move(conn, v1, "done", "iou_eval")
    move(conn, v2, "running", "detect")
    (event_id,) = conn.execute(
        "INSERT INTO outbox_events (event_type, schema_version, job_id, variant_id, variant_version, payload) "
        'VALUES (\'variant_changed\', 1, %s, %s, NULL, \'{"status": "done", "step": "iou_eval"}\') RETURNING event_id',
        [job, v2],
    ).fetchone()
    drain(settings)
    # It names the job but has no place in the variant's order: the job is held (flagged), not
    # folded as if the event were not there, and never folded with it.
    (reason,) = conn.execute("SELECT reason FROM outbox_job_flags WHERE job_id = %s", [job]).fetchone()
    assert f"event {event_id} is a dead letter: event has no variant_version" in reason
    replay(conn, [job], dry_run=False)
    assert conn.execute("SELECT count(*) FROM outbox_job_flags").fetchone()[0] == 1
    assert discard(conn, [event_id]) == {event_id: "discarded"}
    assert job_state(conn, job) == ("running", "detect")
    assert conn.execute("SELECT count(*) FROM outbox_job_flags").fetchone()[0] == 0


def test_repair_of_a_variant_detached_behind_the_outbox_removes_it_from_its_job(conn, engine, settings):
    with engine.begin() as sa:
        job, (v1, v2) = outbox.create_job(sa, variants=2)
    move(conn, v1, "done", "iou_eval")
    move(conn, v2, "failed", "detect")
    drain(settings)
    assert job_state(conn, job) == ("failed", "detect")
    conn.execute("ALTER TABLE jobs_variants DISABLE TRIGGER USER")
    conn.execute("UPDATE jobs_variants SET job_id = NULL WHERE job_variants_id = %s", [v2])
    conn.execute("ALTER TABLE jobs_variants ENABLE TRIGGER USER")
    report = verify(conn)
    assert [d.variant_id for d in report.variant_drift] == [v2]
    repair(conn, report, wait=0)
    drain(settings)
    assert job_state(conn, job) == ("done", "iou_eval")
    assert conn.execute("SELECT count(*) FROM outbox_dead_letters").fetchone()[0] == 0
    assert not verify(conn).drift


def test_retention_folds_a_variant_whose_id_is_the_nil_uuid(conn, settings):
    """The fold walks the segment's variants from the lowest id, the nil UUID included."""
    job = uuid.uuid4()
    nil, other = uuid.UUID(int=0), uuid.UUID(int=2)
    conn.execute("INSERT INTO jobs (job_id, status) VALUES (%s, 'queued')", [job])
    for variant in (nil, other):
        conn.execute(
            "INSERT INTO jobs_variants (job_variants_id, job_id, status) VALUES (%s, %s, 'queued')", [variant, job]
        )
    move(conn, nil, "running", "detect")
    move(conn, other, "done", "iou_eval")
    drain(settings)
    live = job_state(conn, job)
    retain(conn, parse_duration("0s"), chunk_size=1)
    assert conn.execute("SELECT count(*) FROM outbox_events").fetchone()[0] == 0
    baseline = conn.execute("SELECT variant_id FROM outbox_variant_baseline ORDER BY variant_id").fetchall()
    assert [row[0] for row in baseline] == [nil, other]
    write_jobs_behind_the_processor(conn, "UPDATE jobs SET status = NULL, current_step = NULL")
    replay(conn, [job], dry_run=False)
    assert job_state(conn, job) == live
