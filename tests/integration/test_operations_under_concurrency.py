"""Operations that run next to other work: repartitions, prunes of one partition, catch-ups in
several batches, hand-written events. Each interleaving is forced (a hook between two chunks,
batches applied one by one), so each test shows its case every time; job and variant state are
then checked against jobs_variants and the SQL reference (tests/reference.py).
"""

from __future__ import annotations

import random
import uuid

import outbox
from processor import store, workload
from processor.backlog import collect_backlog
from processor.batch import apply_batch
from processor.database import connect
from processor.repartition import repartition
from processor.replay import replay
from processor.retention import parse_duration, retain
from processor.verify import verify
from processor.worker import application_name
from tests.fix_database import make_settings
from tests.helpers import drain, fold_context, job_in_partition, job_state, make_jobs, wait_for
from tests.reference import actual_job_states, reference_job_states

STEPS = ("ingest", "detect", "segment", "iou_eval")


def stored_variant_states(conn) -> dict[uuid.UUID, tuple]:
    rows = conn.execute("SELECT variant_id, job_id, status, step FROM outbox_variant_states WHERE NOT removed")
    return {row[0]: tuple(row[1:]) for row in rows}


def variant_rows(conn) -> dict[uuid.UUID, tuple]:
    rows = conn.execute(
        "SELECT job_variants_id, job_id, status, current_step FROM jobs_variants WHERE job_id IS NOT NULL"
    )
    return {row[0]: tuple(row[1:]) for row in rows}


def repartition_now(db, partitions: int) -> None:
    with connect(db, application_name=application_name("repartition")) as rconn:
        repartition(rconn, partitions, timeout=30)


def drain_all(db) -> None:
    drain(make_settings(db))


def set_each_variant(conn, jobs, rng: random.Random, choices: list[tuple[str, str]]) -> None:
    """Give each variant of ``jobs`` one of the (status, step) ``choices``, at random."""
    for variants in jobs.values():
        for variant in variants:
            status, step = rng.choice(choices)
            workload.write_variant(conn, variant, status, step, plain_sql=True)


def test_replay_while_a_repartition_commits_keeps_every_variant_state(db, conn, engine, settings):
    rng = random.Random(12_1)
    jobs = make_jobs(engine, 120, rng)
    set_each_variant(conn, jobs, rng, [("running", "detect"), ("done", "iou_eval"), ("failed", "segment")])
    drain(settings)
    assert stored_variant_states(conn) == variant_rows(conn)

    # `outbox repartition 3` commits between two chunks of a replay that listed its jobs before it.
    repartitioned: list[int] = []

    def between_chunks(_done: int) -> None:
        if not repartitioned:
            repartition_now(db, 3)
            repartitioned.append(3)

    changes = replay(conn, store.job_ids_all(conn, 0), dry_run=False, chunk_size=20, on_chunk=between_chunks)
    assert repartitioned
    assert changes == [], "nothing was wrong, so a replay changes nothing"
    assert stored_variant_states(conn) == variant_rows(conn)

    # The next event of each job folds it from every one of its variants.
    for variants in jobs.values():
        conn.execute(
            "UPDATE jobs_variants SET status = 'running', current_step = 'ingest' WHERE job_variants_id = %s",
            [variants[0]],
        )
    drain_all(db)
    assert stored_variant_states(conn) == variant_rows(conn)
    assert actual_job_states(conn) == reference_job_states(conn, STEPS)


def _moved_variant_setup(db, conn, engine):
    """Job A in partition 1 with a running variant M, job B in partition 0 with a variant not done yet.

    M then moves to B. Returns (A, B, M, B's own variant).
    """
    repartition_now(db, 2)
    with engine.begin() as sa:
        job_a, (a_own, moving) = outbox.create_job(sa, job_id=job_in_partition(1, 2), variants=2)
        job_b, (b_own,) = outbox.create_job(sa, job_id=job_in_partition(0, 2), variants=1)
        outbox.update_variant(sa, a_own, status="done", step="iou_eval")
        outbox.update_variant(sa, moving, status="running", step="segment")
        outbox.update_variant(sa, b_own, status="running", step="segment")
    drain_all(db)
    conn.execute("UPDATE jobs_variants SET job_id = %s WHERE job_variants_id = %s", [job_b, moving])
    return job_a, job_b, moving, b_own


def _finish_b_and_check(db, conn, job_b, moving, b_own) -> None:
    # B's own variant finishes; the moved one still runs, so B must stay running.
    conn.execute("UPDATE jobs_variants SET status = 'done', current_step = 'iou_eval' WHERE job_variants_id = %s",
                 [b_own])  # fmt: skip
    drain_all(db)
    assert stored_variant_states(conn)[moving] == (job_b, "running", "segment")
    assert job_state(conn, job_b) == ("running", "segment")
    assert stored_variant_states(conn) == variant_rows(conn)
    assert actual_job_states(conn) == reference_job_states(conn, STEPS)


def test_prune_of_the_old_partition_then_replay_keeps_a_moved_variant_in_its_new_job(db, conn, engine, settings):
    _, job_b, moving, b_own = _moved_variant_setup(db, conn, engine)
    drain_all(db)
    retain(conn, parse_duration("0s"))
    replay_every_partition(conn, settings)
    _finish_b_and_check(db, conn, job_b, moving, b_own)


def test_prune_while_the_new_partition_lags_then_replay_keeps_a_moved_variant(db, conn, engine, settings):
    _, job_b, moving, b_own = _moved_variant_setup(db, conn, engine)
    drain(make_settings(db, partition=1))  # partition 0, where the variant arrives, lags behind
    retain(conn, parse_duration("0s"))  # partition 0's events are not all applied: their segment stays
    drain_all(db)
    replay_every_partition(conn, settings)
    _finish_b_and_check(db, conn, job_b, moving, b_own)


def replay_every_partition(conn, settings) -> None:
    """`outbox replay` of every job, as the command does it: partition by partition."""
    for partition in range(store.partitions_get(conn)):
        replay(conn, store.job_ids_all(conn, partition), dry_run=False)


def _partial_catch_up(db, conn, engine, *, jobs: int, batches: int, batch_size: int):
    """Finish ``jobs`` jobs (two variants each, in one transaction), then apply ``batches`` batches of
    that catch-up by hand."""
    settings = make_settings(db)
    with engine.begin() as sa:
        made = [outbox.create_job(sa, variants=2)[0] for _ in range(jobs)]
    drain(settings)
    conn.execute("UPDATE jobs_variants SET status = 'done', current_step = 'iou_eval' WHERE job_id = ANY(%s)",
                 [list(made)])  # fmt: skip
    ctx = fold_context(settings)
    with connect(db, application_name=application_name()) as wconn:
        cursor = store.checkpoint_get(wconn, 0).cursor
        for _ in range(batches):
            result = apply_batch(wconn, ctx, expected=cursor, limit=batch_size)
            cursor = result.cursor
    return made, result, ctx


def test_verify_during_a_catch_up_in_several_batches_reports_no_drift(db, conn, engine):
    made, result, _ = _partial_catch_up(db, conn, engine, jobs=100, batches=3, batch_size=20)
    assert not result.complete  # the catch-up is still open: its jobs are folded once it closes
    report = verify(conn)
    assert report.job_drift == () and report.stuck_jobs == () and report.variant_drift == ()
    assert not report.drift
    assert report.jobs_in_flight == len(made)
    drain_all(db)
    assert not verify(conn).drift
    assert actual_job_states(conn) == reference_job_states(conn, STEPS)


def test_backlog_counts_the_jobs_of_a_catch_up_left_open_by_an_exactly_full_batch(db, conn, engine):
    made, result, _ = _partial_catch_up(db, conn, engine, jobs=50, batches=1, batch_size=100)
    assert result.events == 100 and not result.complete  # every event applied, none folded yet
    report = collect_backlog(conn)
    assert report.pending_events + report.jobs_awaiting_fold > 0
    assert report.oldest_pending_age_seconds is not None and report.oldest_pending_age_seconds > 0
    assert store.work_pending(conn) > 0
    assert all(job_state(conn, job)[0] != "done" for job in made)
    drain_all(db)
    report = collect_backlog(conn)
    assert report.pending_events == 0 and report.jobs_awaiting_fold == 0
    assert report.oldest_pending_age_seconds is None
    assert all(job_state(conn, job) == ("done", "iou_eval") for job in made)


def test_an_event_with_a_version_capture_never_issued_does_not_freeze_its_variant(db, conn, engine, settings):
    from tests.acceptance.test_cli import outbox_cli
    from tests.fix_database import subprocess_env

    with engine.begin() as sa:
        job, (v1, v2) = outbox.create_job(sa, variants=2)
        outbox.update_variant(sa, v1, status="running", step="detect")
        outbox.update_variant(sa, v2, status="done", step="iou_eval")
    drain(settings)
    (event_id,) = conn.execute(
        "INSERT INTO outbox_events (event_type, schema_version, job_id, variant_id, variant_version, payload) "
        'VALUES (\'variant_changed\', 1, %s, %s, 4611686018427387904, \'{"status": "done", "step": "iou_eval"}\') '
        "RETURNING event_id",
        [job, v1],
    ).fetchone()
    drain(settings)
    conn.execute("UPDATE jobs_variants SET status = 'running', current_step = 'segment' WHERE job_variants_id = %s",
                 [v1])  # fmt: skip
    drain(settings)
    # The made-up version is not trusted: the variant's state follows its row, whatever came later.
    assert stored_variant_states(conn)[v1] == (job, "running", "segment")

    env = subprocess_env(db)
    repaired = outbox_cli("verify", "--repair", env=env)
    output = repaired.stdout + repaired.stderr
    # What repair cannot decide is said, with the event and what to run, and the exit code says so.
    assert repaired.returncode == 1, output
    assert str(event_id) in output and "dead-letters" in output
    again = outbox_cli("verify", "--repair", env=env)
    assert again.returncode == 1
    discarded = outbox_cli("dead-letters", "discard", str(event_id), env=env)
    assert discarded.returncode == 0, discarded.stdout + discarded.stderr
    assert outbox_cli("verify", env=env).returncode == 0
    assert job_state(conn, job) == ("running", "segment")
    assert actual_job_states(conn) == reference_job_states(conn, STEPS)


def test_a_pipeline_change_refolds_every_job_it_affects(db, conn, engine, settings):
    from tests.acceptance.test_cli import outbox_cli
    from tests.fix_database import subprocess_env

    rng = random.Random(12_9)
    jobs = make_jobs(engine, 30, rng)
    set_each_variant(conn, jobs, rng, [("running", "detect"), ("done", "iou_eval"), ("queued", "segment")])
    drain(settings)
    new_steps = ("ingest", "detect", "segment", "iou_eval", "review")  # iou_eval is no longer final
    env = subprocess_env(db)

    # A worker started with another pipeline in its environment never folds under it silently.
    mismatched = outbox_cli("run", "--until-idle", env={**env, "OUTBOX_PIPELINE_STEPS": ",".join(new_steps)})
    stale = actual_job_states(conn) != reference_job_states(conn, new_steps)
    assert not (mismatched.returncode == 0 and stale), "the worker folded under a new pipeline and left jobs stale"
    assert mismatched.returncode == 1 and "outbox pipeline set" in mismatched.stderr, mismatched.stderr
    assert len(mismatched.stderr.strip().splitlines()) == 1

    # Changed through the product: every job it affects is folded again.
    changed = outbox_cli("pipeline", "set", ",".join(new_steps), env=env)
    assert changed.returncode == 0, changed.stderr
    new_env = {**env, "OUTBOX_PIPELINE_STEPS": ",".join(new_steps)}
    assert outbox_cli("run", "--until-idle", env=new_env).returncode == 0
    assert actual_job_states(conn) == reference_job_states(conn, new_steps)
    assert outbox_cli("verify", env=new_env).returncode == 0
    unset = {k: v for k, v in env.items() if k != "OUTBOX_PIPELINE_STEPS"}
    assert outbox_cli("verify", env=unset).returncode == 0  # unset: the database's pipeline


def _repartition_held_open(db, partitions: int):
    """`outbox repartition N`, step by step (processor/repartition.py), left open at the end of its switch."""
    held = connect(db, application_name=application_name("repartition"), autocommit=False)
    store.repartition_hold_writers(held)
    store.checkpoints_lock_all(held)
    store.repartition_switch(held, partitions)
    return held


def test_an_operation_that_waited_for_a_repartition_holds_the_checkpoints_it_created(db, conn):
    import threading

    from tests.helpers import waiting_on_lock

    held = _repartition_held_open(db, 3)
    locked: dict[int, object] = {}
    with connect(db, application_name=application_name("replay")) as op:

        def lock_all() -> None:
            with op.transaction():
                locked.update(store.checkpoints_lock_all(op))

        thread = threading.Thread(target=lock_all)
        thread.start()
        wait_for(lambda: waiting_on_lock(conn, op.info.backend_pid), what="the operation to wait for the repartition")
        held.commit()
        held.close()
        thread.join(timeout=30)
    assert sorted(locked) == [0, 1, 2]  # not only the one checkpoint that existed when it started


def test_prune_and_repartition_do_not_deadlock(db, conn, engine):
    import threading

    repartition_now(db, 2)
    with engine.begin() as sa:
        for partition in (0, 1):
            outbox.create_job(sa, job_id=job_in_partition(partition, 2), variants=1)
    drain_all(db)
    conn.execute("UPDATE jobs_variants SET status = 'running'")  # pending: the repartition waits for it
    results: dict[str, object] = {}

    def run(key, function) -> None:
        try:
            results[key] = function()
        except Exception as exc:
            results[key] = exc

    with (
        connect(db, application_name=application_name("repartition")) as rconn,
        connect(db, application_name=application_name("prune")) as pconn,
    ):
        repartitioning = threading.Thread(target=run, args=("repartition", lambda: repartition(rconn, 3, timeout=60)))
        repartitioning.start()
        wait_for(
            lambda: conn.execute(
                "SELECT count(*) FROM pg_locks WHERE pid = %s AND relation = 'outbox_events'::regclass AND mode = "
                "'ShareLock' AND granted",
                [rconn.info.backend_pid],
            ).fetchone()[0],
            what="the repartition to hold the writers back",
        )
        # Prune waits for the repartition's locks at most its lock timeout each time, never both ways.
        pruning = threading.Thread(target=run, args=("prune", lambda: retain(pconn, parse_duration("0s"))))
        pruning.start()
        pruning.join(timeout=60)
        assert not pruning.is_alive(), "prune waited for the repartition"
        drain_all(db)  # the workers apply what was pending: the repartition goes on
        repartitioning.join(timeout=60)
    assert not isinstance(results["repartition"], Exception), results["repartition"]
    assert not isinstance(results["prune"], Exception), results["prune"]
    assert results["prune"].kept(), "the repartition held the writers back: nothing could go meanwhile"
    after = retain(conn, parse_duration("0s"))
    assert not after.kept(), after
    assert store.partitions_get(conn) == 3


def test_a_worker_claiming_a_partition_a_repartition_removes_leaves_no_job_behind(db, conn, engine):
    import threading

    repartition_now(db, 4)
    job = job_in_partition(3, 4)
    with engine.begin() as sa:
        outbox.create_job(sa, job_id=job, variants=1)
    conn.execute("UPDATE jobs_variants SET status = 'running', current_step = 'not-a-step' WHERE job_id = %s", [job])
    drain_all(db)
    assert conn.execute("SELECT count(*) FROM outbox_job_flags").fetchone()[0] == 1
    held = _repartition_held_open(db, 2)
    worker = threading.Thread(target=lambda: drain_all(db))  # claims the old partitions, flagged job's included
    worker.start()
    wait_for(
        lambda: conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s AND wait_event_type = 'Lock'",
            ["outbox-worker:%"],
        ).fetchone()[0],
        what="the worker to wait for the repartition",
    )
    held.commit()
    held.close()
    worker.join(timeout=60)
    drain_all(db)
    assert store.work_pending(conn) == 0  # nothing left for a partition no worker takes
    assert conn.execute("SELECT partition FROM outbox_dirty_jobs").fetchall() == []
