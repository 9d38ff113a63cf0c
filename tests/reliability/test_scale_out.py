"""Partitioned scale-out: `outbox run` workers share the partitions, take over from killed ones,
rebalance as workers come and go, and follow `outbox repartition`, while writers write.

Two audit triggers watch the product from inside the database: each checkpoint move (and each job
state write) records whether the session that made it held the partition's consumer lock at that
moment, so no partition was ever processed by two workers at once; the checkpoint moves are then
replayed here, with a visibility rule written apart from the processor's, to show that each event
was applied exactly once. Job state ends equal to the independent reference (tests/reference.py).
The last tests force races with `outbox repartition` (and one in the SIGTERM handler) open with
locks, so that they happen every time rather than once in a while.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest

import outbox
from processor import store, workload
from processor.backlog import collect_backlog
from processor.database import connect
from processor.metrics import WorkerMetrics
from processor.repartition import repartition
from processor.workload import ChurnWriters
from tests.fix_database import make_settings, subprocess_env
from tests.helpers import WorkerProcess, drain, make_jobs, pending_work, wait_for, waiting_on_lock
from tests.reference import actual_job_states, partition_of, reference_job_states
from tests.reliability.fleet import (
    ROOT,
    STEPS,
    backend_of,
    check_audit,
    check_final_state,
    covered,
    events_applied,
    fleet,
    install_audits,
    owners,
    repartition_now,
    run_cli,
    shares,
    stop_cleanly,
    worker_env,
)

__all__ = ["fleet"]  # the fixture

# --- The tests ---------------------------------------------------------------------------------


def test_workers_killed_one_by_one_under_writers_are_taken_over_and_every_event_applied_once(
    db, conn, engine, fleet, capsys
):
    rng = random.Random(8)
    install_audits(conn)
    repartition_now(db, 8)
    jobs = make_jobs(engine, 150, rng)
    env = worker_env(db, OUTBOX_PARTITIONS="8", OUTBOX_BATCH_SIZE="16")
    live = [fleet(env, f"worker-{i}") for i in range(3)]
    started = list(live)
    spawned = time.monotonic()
    wait_for(lambda: shares(conn, {w.pid for w in live}, 8) == [2, 3, 3], timeout=60, what="3 workers sharing 8")
    first_balance = time.monotonic() - spawned

    takeovers: list[float] = []
    joins: list[str] = []
    with ChurnWriters(db, engine, jobs, seed=rng.random()) as writers:
        for kill in range(3):
            mark = events_applied(conn)
            wait_for(lambda m=mark: events_applied(conn) >= m + 300, timeout=60, what="the workers to apply events")
            victim = rng.choice(live)
            live.remove(victim)
            killed = time.monotonic()
            victim.signal(signal.SIGKILL)
            # The replacement starts at once; it takes seconds to start, the takeover a fraction of one.
            replacement = fleet(env, f"worker-{3 + kill}")
            started.append(replacement)
            live.append(replacement)
            pids = {w.pid for w in live}
            wait_for(lambda p=pids: covered(conn, p, 8), timeout=30, what="the others to take over")
            takeovers.append(time.monotonic() - killed)
            assert victim.wait() == -signal.SIGKILL
            wait_for(
                lambda r=replacement: backend_of(conn, "worker", r.pid), timeout=60, what="the replacement to connect"
            )
            joined = time.monotonic()
            wait_for(lambda p=pids: shares(conn, p, 8) == [2, 3, 3], timeout=60, what="the replacement's share")
            joins.append(f"{joined - killed:.2f} + {time.monotonic() - joined:.2f} s")
        mark = events_applied(conn)
        wait_for(lambda: events_applied(conn) >= mark + 300, timeout=60, what="the workers to apply events")
        writers.stop()
    writers.check()
    applied_while_writing = events_applied(conn)
    wait_for(lambda: pending_work(conn) == 0, timeout=120, what="the workers to drain")
    drained = time.monotonic() - writers.stopped
    assert covered(conn, {w.pid for w in live}, 8)

    jobs_total, jobs_done = check_final_state(conn, 8)
    assert jobs_done > 0
    report = check_audit(conn)
    # Every worker applied events, the killed ones too.
    assert {int(app.rsplit(":", 1)[1]) for app in report.by_worker} == {w.pid for w in started}
    with capsys.disabled():
        print(
            f"\nscale-out under kills: 8 partitions, 3 workers (first balanced in {first_balance:.2f} s from spawn); "
            f"{writers.summary()}; {applied_while_writing} of {report.events} events applied while writing, "
            f"drained {drained:.2f} s after the last write; {jobs_total} jobs ({jobs_done} done) equal to the "
            f"reference\n  takeover after SIGKILL (kill -> all 8 partitions owned again): "
            f"{', '.join(f'{t:.3f} s' for t in takeovers)}\n  replacement (spawned at the kill): connected + "
            f"shares back to 3/3/2: {', '.join(joins)}\n  audit: {report}"
        )


def test_shares_follow_the_workers_that_join_and_leave(db, conn, fleet, capsys):
    repartition_now(db, 8)
    env = worker_env(db)
    timings = []

    def owner_pids() -> list[int | None]:
        return [p.owner_pid for p in collect_backlog(conn).partitions]

    def expect(label: str, workers: list[WorkerProcess], counts: list[int]) -> float:
        pids = {w.pid for w in workers}

        def reached() -> bool:
            held = owner_pids()
            return None not in held and set(held) <= pids and sorted(Counter(held).values()) == counts

        wait_for(reached, timeout=60, what=f"shares {counts} ({label})")
        return time.monotonic()

    def join(label: str, workers: list[WorkerProcess], counts: list[int]) -> WorkerProcess:
        spawned = time.monotonic()
        newcomer = fleet(env, label)
        wait_for(lambda: backend_of(conn, "worker", newcomer.pid), timeout=60, what=f"the {label} worker to connect")
        connected = time.monotonic()
        balanced = expect(label, [*workers, newcomer], counts)
        shown = "/".join(str(n) for n in sorted(counts, reverse=True))
        timings.append(
            f"{label} worker: connected {connected - spawned:.2f} s after spawn, shares {shown} "
            f"{balanced - connected:.2f} s later"
        )
        return newcomer

    first = join("1st", [], [8])
    second = join("2nd", [first], [4, 4])
    third = join("3rd", [first, second], [2, 3, 3])

    # The CLI shows the same: every partition owned, by the three workers.
    result = run_cli(db, "backlog", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["partition_count"] == 8
    assert sorted(Counter(p["owner_pid"] for p in report["partitions"]).values()) == [2, 3, 3]
    assert {p["owner_pid"] for p in report["partitions"]} == {first.pid, second.pid, third.pid}
    assert report["standbys"] == 0

    held = Counter(owner_pids())
    leaving = max((first, second, third), key=lambda w: held[w.pid])
    stays = [w for w in (first, second, third) if w is not leaving]
    stopped = time.monotonic()
    stop_cleanly(leaving)
    exited = time.monotonic()
    balanced = expect("SIGTERM", stays, [4, 4])
    timings.append(
        f"SIGTERM to one worker: exited {exited - stopped:.2f} s later, shares 4/4 {balanced - exited:.2f} s after that"
    )
    assert "processed 0 events" in leaving.output()
    with capsys.disabled():
        print("\nrebalancing (8 partitions, standby interval 0.1 s): " + "; ".join(timings))


def test_live_repartition_under_writers(db, conn, engine, fleet, capsys):
    rng = random.Random(4)
    install_audits(conn)
    repartition_now(db, 2)
    jobs = make_jobs(engine, 120, rng)
    base = {"OUTBOX_BATCH_SIZE": "40"}
    pinned_2 = fleet(worker_env(db, OUTBOX_PARTITIONS="2", **base), "pinned-2")
    follower = fleet(worker_env(db, **base), "follower")
    wait_for(lambda: shares(conn, {pinned_2.pid, follower.pid}, 2) == [1, 1], timeout=60, what="1 partition each")
    figures = []

    def switch(partitions: int, before: int) -> None:
        mark = events_applied(conn)
        wait_for(lambda: events_applied(conn) >= mark + 400, timeout=60, what="the workers to apply events")
        started = time.monotonic()
        result = run_cli(db, "repartition", str(partitions), "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert (report["before"], report["after"]) == (before, partitions)
        figures.append(
            f"{before} -> {partitions} in {time.monotonic() - started:.2f} s (command included), writers held "
            f"{report['writers_held_seconds']:.3f} s, {report['events_moved']} applied events relabelled"
        )

    with ChurnWriters(db, engine, jobs, seed=rng.random()) as writers:
        switch(4, 2)
        # The worker told to expect 2 partitions stops with a clear error; the other follows the count.
        assert pinned_2.wait(timeout=30) == 1, pinned_2.output()[-3000:]
        assert (
            "error: the database has 4 partitions but OUTBOX_PARTITIONS is 2: run `outbox repartition 2` or set "
            "OUTBOX_PARTITIONS=4" in pinned_2.output()
        ), pinned_2.output()[-3000:]
        wait_for(lambda: shares(conn, {follower.pid}, 4) == [4], timeout=30, what="the follower to take all 4")
        pinned_4 = fleet(worker_env(db, OUTBOX_PARTITIONS="4", **base), "pinned-4")
        wait_for(lambda: shares(conn, {follower.pid, pinned_4.pid}, 4) == [2, 2], timeout=60, what="2 each")
        switch(2, 4)
        assert pinned_4.wait(timeout=30) == 1, pinned_4.output()[-3000:]
        assert (
            "error: the database has 2 partitions but OUTBOX_PARTITIONS is 4: run `outbox repartition 4` or set "
            "OUTBOX_PARTITIONS=2" in pinned_4.output()
        ), pinned_4.output()[-3000:]
        wait_for(lambda: shares(conn, {follower.pid}, 2) == [2], timeout=30, what="the follower to take both")
        mark = events_applied(conn)
        wait_for(lambda: events_applied(conn) >= mark + 400, timeout=60, what="events applied under 2 partitions")
        writers.stop()
    writers.check()
    wait_for(lambda: pending_work(conn) == 0, timeout=120, what="the follower to drain")
    drained = time.monotonic() - writers.stopped

    assert conn.execute("SELECT partitions FROM outbox_partitioning").fetchone() == (2,)
    jobs_total, jobs_done = check_final_state(conn, 2)
    report = check_audit(conn)
    assert report.repartitions == 3
    with capsys.disabled():
        print(
            f"\nlive repartition: {'; '.join(figures)}; {writers.summary()}; drained {drained:.2f} s after the "
            f"last write; {jobs_total} jobs ({jobs_done} done) equal to the reference\n  audit: {report}"
        )


def test_repartition_that_cannot_drain_fails_and_changes_nothing(db, conn, engine):
    repartition_now(db, 2)
    make_jobs(engine, 10, random.Random(3))  # pending: no worker runs

    def state() -> tuple[Any, ...]:
        return (
            conn.execute("SELECT partitions FROM outbox_partitioning").fetchone(),
            conn.execute("SELECT * FROM outbox_checkpoints ORDER BY partition").fetchall(),
            conn.execute("SELECT event_id, partition FROM outbox_events ORDER BY event_id").fetchall(),
            conn.execute("SELECT pg_get_functiondef('outbox_partition_of'::regproc)").fetchone(),
        )

    before = state()
    started = time.monotonic()
    result = run_cli(db, "repartition", "3", "--timeout", "1")
    took = time.monotonic() - started
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: the outbox did not drain within 1 s ("), lines[0]
    assert "Nothing was changed" in lines[0]
    assert state() == before
    # The writers are not held back any more.
    with connect(db, application_name="writer") as wconn:
        wconn.execute("SET lock_timeout = '5s'")
        _, variants = outbox.create_job(wconn, variants=1)
        outbox.update_variant(wconn, variants[0], status="running", step="detect")
    # Once drained, the same change goes through.
    drain(make_settings(db))
    repartition_now(db, 3)
    assert conn.execute("SELECT partitions FROM outbox_partitioning").fetchone() == (3,)
    print(f"\nrepartition --timeout 1 without workers: exit 1 after {took:.2f} s (command included): {lines[0]}")


def test_partition_function_is_the_documented_hash(db, conn, engine):
    rng = random.Random(2)
    job_ids = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(300)]
    job_ids += [uuid.uuid1() for _ in range(50)] + [uuid.UUID(int=0), uuid.UUID(int=(1 << 128) - 1)]
    for partitions in (2, 7, 8):
        drain(make_settings(db))  # repartition needs a drained outbox
        repartition_now(db, partitions)
        got = dict(conn.execute("SELECT id, outbox_partition_of(id) FROM unnest(%s::uuid[]) AS t (id)", [job_ids]))
        assert got == {job_id: partition_of(job_id, partitions) for job_id in job_ids}
        assert set(got.values()) == set(range(partitions))
        # Events written now carry their job's partition; those written before were relabelled.
        make_jobs(engine, 20, rng)
        labels = conn.execute("SELECT job_id, partition, outbox_partition_of(job_id) FROM outbox_events").fetchall()
        assert len(labels) > 20
        assert all(row[1] == row[2] == partition_of(row[0], partitions) for row in labels)
        checkpoints = [row[0] for row in conn.execute("SELECT partition FROM outbox_checkpoints ORDER BY 1")]
        assert checkpoints == list(range(partitions))
    drain(make_settings(db))
    assert pending_work(conn) == 0
    assert actual_job_states(conn) == reference_job_states(conn, STEPS)


def _jobs_in_partitions(engine: Any, variants: list[list[tuple[str, str | None]]], partitions: list[int]) -> list[Any]:
    """Create one job per entry, in the given partitions (of 8), with variants at the given (status, step)."""
    created = []
    with engine.begin() as sa:
        for states, partition in zip(variants, partitions, strict=True):
            job_id = next(j for j in iter(uuid.uuid4, None) if partition_of(j, 8) == partition)
            _, ids = outbox.create_job(sa, job_id=job_id, variants=len(states))
            for variant, (status, step) in zip(ids, states, strict=True):
                outbox.update_variant(sa, variant, status=status, step=step)
            created.append((job_id, ids))
    return created


def _move(engine: Any, variant: uuid.UUID, job_id: uuid.UUID, status: str | None = None) -> None:
    """Move ``variant`` to ``job_id``, and to (status, segment) in the same transaction if a status is given."""
    with engine.begin() as sa:
        workload.move_variant(sa, variant, job_id)
        if status is not None:
            workload.write_variant(sa, variant, status, "segment")


def test_variants_moving_between_jobs_of_different_partitions(db, conn, engine, fleet):
    repartition_now(db, 8)
    env = worker_env(db)
    workers = [fleet(env, f"worker-{i}") for i in range(2)]
    wait_for(lambda: shares(conn, {w.pid for w in workers}, 8) == [4, 4], timeout=60, what="4 partitions each")
    held = owners(conn)
    a = 0
    b = next(p for p in range(8) if held[p] != held[a])  # a job of each worker

    # The one unfinished variant of the first job moves to the second: the first is done, the second not.
    done = ("done", "iou_eval")
    (j1, v1), (j2, _) = _jobs_in_partitions(engine, [[done, ("running", "detect")], [done]], [a, b])
    _move(engine, v1[1], j2)
    # A variant moved back and forth between partitions, the last move with a status change in the
    # same transaction; and the only variant of a job moved away and back.
    (j3, v3), (j4, v4) = _jobs_in_partitions(engine, [[done, ("failed", "segment")], [done, done]], [b, a])
    for target in (j4, j3, j4, j3):
        _move(engine, v3[1], target)
    _move(engine, v4[0], j3, status="running")
    (j5, v5), (j6, _) = _jobs_in_partitions(engine, [[("running", "ingest")], [done]], [a, b])
    _move(engine, v5[0], j6)
    _move(engine, v5[0], j5)

    # Random moves among jobs of every partition, from two writers at once.
    pool = _jobs_in_partitions(engine, [[("queued", None)] * 3 for _ in range(16)], [p % 8 for p in range(16)])
    variants = [v for _, ids in pool for v in ids]
    errors: list[BaseException] = []

    def mover(seed: int, mine: list[uuid.UUID]) -> None:
        mrng = random.Random(seed)
        try:
            for _ in range(60):
                variant = mrng.choice(mine)
                status = mrng.choice((None, "running", "done", "failed"))
                _move(engine, variant, mrng.choice(pool)[0], status=status)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=mover, args=(i, variants[i::2])) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]

    wait_for(lambda: pending_work(conn) == 0, timeout=60, what="the workers to drain")
    actual = actual_job_states(conn)
    assert actual[j1] == ("done", "iou_eval")
    assert actual[j2] == ("running", "detect")
    assert actual[j3] == ("running", "segment")
    assert actual[j5] == ("running", "ingest")
    assert actual == reference_job_states(conn, STEPS)


@pytest.mark.parametrize("first", ["old job's partition first", "new job's partition first"])
def test_a_moved_variant_is_folded_right_whichever_partition_applies_first(db, conn, engine, first):
    """The two partitions of a move applied one after the other, in both orders (one-off workers)."""
    repartition_now(db, 8)
    done = ("done", "iou_eval")
    (j1, v1), (j2, v2) = _jobs_in_partitions(engine, [[done, ("failed", "detect")], [done, done]], [1, 6])
    # v1[1] goes to j2 and back twice; v2[0] goes to j1 and stays, after a status change.
    for target in (j2, j1, j2, j1):
        _move(engine, v1[1], target)
    _move(engine, v2[0], j1, status="running")
    _move(engine, v1[1], j2)
    order = (1, 6) if first.startswith("old") else (6, 1)
    for partition in order:
        drain(make_settings(db, partition=partition))
    assert pending_work(conn) == 0
    actual = actual_job_states(conn)
    assert actual == reference_job_states(conn, STEPS)
    assert actual[j1] == ("running", "segment")
    assert actual[j2] == ("failed", "detect")


# --- Races with `outbox repartition`, forced --------------------------------------------------
# Each holds outbox_checkpoints in ACCESS EXCLUSIVE mode so that a reader that has read the
# partition count waits to read a checkpoint; a repartition from 8 to 3 partitions then commits in
# the same transaction as the lock, and the reader goes on with a count that no longer holds.


def test_a_worker_claiming_a_partition_that_a_repartition_removes_keeps_running(db, conn, fleet):
    repartition_now(db, 8)
    lock_class = store.CONSUMER_LOCK_CLASS
    for partition in range(8):  # the test holds every partition: the worker stands by
        conn.execute("SELECT pg_advisory_lock(%s, %s)", [lock_class, partition])
    worker = fleet(worker_env(db), "worker")
    wait_for(lambda: "standby: no partition free" in worker.output(), timeout=60, what="the worker to stand by")
    backend = wait_for(lambda: backend_of(conn, "worker", worker.pid), what="the worker's session")
    with connect(db, application_name="outbox-tests", autocommit=False) as blocker:
        blocker.execute("LOCK TABLE outbox_checkpoints IN ACCESS EXCLUSIVE MODE")
        conn.execute("SELECT pg_advisory_unlock(%s, 5)", [lock_class])
        wait_for(
            lambda: owners(conn).get(5) == worker.pid and waiting_on_lock(conn, backend),
            what="the worker to claim partition 5 and wait to read its checkpoint",
        )
        repartition(blocker, 3)
        blocker.commit()
    conn.execute("SELECT pg_advisory_unlock_all()")
    wait_for(
        lambda: covered(conn, {worker.pid}, 3) or worker.process.poll() is not None,
        timeout=30,
        what="the worker to take the 3 partitions left",
    )
    assert worker.process.poll() is None, worker.output()[-3000:]
    assert set(owners(conn)) == {0, 1, 2}


def test_backlog_during_a_repartition_shows_one_partition_count(db, conn):
    repartition_now(db, 8)
    with connect(db, application_name="outbox-tests", autocommit=False) as blocker:
        blocker.execute("LOCK TABLE outbox_checkpoints IN ACCESS EXCLUSIVE MODE")
        backlog = subprocess.Popen(
            [sys.executable, "-m", "processor.cli", "backlog", "--json"],
            env=subprocess_env(db),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            backend = wait_for(lambda: backend_of(conn, "backlog", backlog.pid), timeout=60, what="its session")
            wait_for(lambda: waiting_on_lock(conn, backend), what="`outbox backlog` to wait for a checkpoint")
            repartition(blocker, 3)
            blocker.commit()
            out, err = backlog.communicate(timeout=60)
        finally:
            backlog.kill()
            backlog.wait()
    assert backlog.returncode == 0, err
    report = json.loads(out)
    assert len(report["partitions"]) == report["partition_count"]


def test_metrics_forget_the_partitions_a_repartition_removes(db, engine):
    repartition_now(db, 8)
    make_jobs(engine, 120, random.Random(7))  # job ids are random: 120 leave no partition empty (p < 1e-6)
    metrics = WorkerMetrics()

    def refresh() -> dict[int, float | None]:
        """One pass of the worker's metrics refresh thread; each partition's pending events."""
        metrics.refreshed.clear()  # set at the end of a pass
        stop = threading.Event()
        thread = threading.Thread(target=metrics.refresh_from_database, args=(db, stop, 3600.0))
        thread.start()
        try:
            assert metrics.refreshed.wait(30), "no refresh"
            # While it runs: the thread exports nothing scanned once it stops.
            return {
                p: metrics.registry.get_sample_value("outbox_pending_events", {"partition": str(p)}) for p in range(8)
            }
        finally:
            stop.set()
            thread.join()

    assert all(pending for pending in refresh().values())
    drain(make_settings(db))
    repartition_now(db, 3)
    after = refresh()
    assert [after[p] for p in range(3)] == [0, 0, 0]
    stale = {p: after[p] for p in range(3, 8) if after[p]}
    assert not stale, f"pending events still exported for removed partitions: {stale}"


def test_sigterm_while_the_worker_waits_stops_it(tmp_path):
    """The SIGTERM handler of `outbox run` calls Worker.stop, so threading.Event.set, in the main thread.
    When the signal lands while that thread holds the same Event's lock (inside Event.wait, which the
    idle worker calls between polls: the handler runs between two bytecodes), set() waits for a lock
    its own thread holds, forever; a second SIGTERM or SIGINT runs into the same lock. Seen in ~1 of
    100-200 SIGTERMs to idle workers (their stacks: handle -> stop -> set -> __enter__); here the
    window is held open so that it happens every time.
    """
    script = tmp_path / "sigterm_in_wait.py"
    script.write_text(
        "import signal\n"
        "from processor.cli_common import stop_on_signals\n"
        "from processor.settings import load_settings\n"
        "from processor.worker import Worker\n"
        "settings = load_settings(database_url='postgresql://nobody@127.0.0.1:1/none')\n"
        "worker = Worker(settings, settings.database())\n"
        "print('ready', flush=True)\n"
        "with stop_on_signals(worker):\n"
        "    with worker._stopping._cond:  # where Event.wait holds it\n"
        "        signal.raise_signal(signal.SIGTERM)\n"
        "import time\n"
        "deadline = time.monotonic() + 5\n"
        "while not worker.stopping and time.monotonic() < deadline:  # a stop handed to another thread\n"
        "    time.sleep(0.01)\n"
        "print('stopping' if worker.stopping else 'not stopping')\n"
    )
    process = subprocess.Popen(
        [sys.executable, str(script)],
        env=subprocess_env(None, PYTHONFAULTHANDLER="1", PYTHONPATH=str(ROOT)),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"  # imported: from here on it takes milliseconds
        out, _ = process.communicate(timeout=6)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        out, _ = process.communicate(timeout=30)
        raise AssertionError(
            f"hung (the SIGTERM handler must not take the locks the main thread holds):\n{out}"
        ) from None
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, out
    assert out.splitlines()[-1] == "stopping", out
