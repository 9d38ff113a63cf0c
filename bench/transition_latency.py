"""Latency from a writer's commit to a subscriber's handler: job transitions end to end (migration 0012).

    python bench/transition_latency.py [--rates 500,2000] [--seconds 25] [--runs 3] [--wakeup poll,notify]

For each run, rate and worker wake-up: a scratch database (migrated as bench/run.py does), `outbox
run` as a subprocess (OUTBOX_WAKEUP poll, or notify with the writers' notify trigger), an
``outbox.Subscriber`` (sync, default settings: LISTEN on ``outbox_transitions``, 1 s poll as the
safety net) in a child process whose handler records ``time.time()`` per call, and writer threads
that apply single-variant updates open loop at a fixed rate. Jobs of --variants variants go
through the pipeline (ingest -> detect -> segment -> iou_eval -> done), one variant per update, so
that a job transition happens every --variants updates of it on average.

Latency of a transition = the handler's call time minus the time.time() at which the writer's
commit of the update that caused it returned. The cause is known exactly: every job takes the same
sequence of updates, so the job state after each of them is known in advance (processor.fold), and
the transition to state S of job J was caused by the first update of J after which J folds to S.
bench/README.md ("Job transitions (migration 0012)") describes the method. Benchmarks print
figures; tests never assert timings.

Scratch databases on the server of OUTBOX_BENCH_DATABASE_URL (or OUTBOX_TEST_DATABASE_URL), else
the embedded server. Figures are medians of --runs runs.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import math
import os
import select
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # run.py and latency.py, when started as `python bench/transition_latency.py`
    sys.path.insert(0, str(HERE))

import psycopg  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from outbox.events import VariantStatus  # noqa: E402
from processor import store, subscriptions  # noqa: E402
from processor.database import DatabaseUrl, connect  # noqa: E402
from processor.fold import JobState, Pipeline, VariantState, fold_job  # noqa: E402

RESULTS = HERE / "results"
DATABASE = "outbox_bench_transitions"
SUBSCRIPTION = "bench-latency"
STEPS = ("ingest", "detect", "segment", "iou_eval")  # bench/run.py's pipeline
PIPELINE = Pipeline(STEPS)
WAKEUPS = ("poll", "notify")
UPDATE_SQL = "UPDATE jobs_variants SET status = %s, current_step = %s WHERE job_variants_id = %s"
JOBS_SQL = "INSERT INTO jobs (job_id, status) SELECT unnest(%(jobs)s::uuid[]), 'queued'"
VARIANTS_SQL = """
INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step)
SELECT * FROM unnest(%(ids)s::uuid[], %(jobs)s::uuid[], %(statuses)s::text[], %(steps)s::text[])
"""
HEAD_SQL = """
SELECT (SELECT position FROM outbox_subscriptions WHERE name = %(name)s),
       (SELECT coalesce(max(transition_id), 0) FROM outbox_job_transitions)
"""


# The workload: every job takes the same sequence of updates


@dataclass(frozen=True)
class JobPath:
    """The updates every job takes, one variant each, and the job state after each prefix of them."""

    variants: int
    updates: list[tuple[int, str, str]]  # (variant, status, step), in order
    states: list[JobState]  # states[n]: the job's state after the first n updates

    @classmethod
    def of(cls, variants: int) -> JobPath:
        updates = [(v, "running", step) for step in STEPS for v in range(variants)]
        updates += [(v, "done", STEPS[-1]) for v in range(variants)]
        job, ids = uuid.UUID(int=1), [uuid.UUID(int=2 + v) for v in range(variants)]
        current: list[tuple[str, str | None]] = [("queued", None)] * variants
        states = []
        for n in range(len(updates) + 1):
            folded = fold_job(
                [VariantState(ids[v], job, 1, VariantStatus(s), step) for v, (s, step) in enumerate(current)], PIPELINE
            )
            assert folded is not None
            states.append(folded)
            if n < len(updates):
                v, status, step = updates[n]
                current = [*current[:v], (status, step), *current[v + 1 :]]
        return cls(variants, updates, states)

    def variant_states(self, phase: int) -> list[tuple[str, str | None]]:
        """Each variant's (status, step) after the first ``phase`` updates."""
        current: list[tuple[str, str | None]] = [("queued", None)] * self.variants
        for v, status, step in self.updates[:phase]:
            current[v] = (status, step)
        return current

    def transition_at(self, n: int) -> tuple[str, str | None] | None:
        """The state the job moves to with update ``n`` (0-based), None if that update changes nothing."""
        before, after = self.states[n], self.states[n + 1]
        if (before.status, before.current_step) == (after.status, after.current_step):
            return None
        return (str(after.status), after.current_step)


@dataclass
class Schedule:
    """Which update is due when, from which writer connection, on which job.

    Update i is due at start + i / rate and belongs to writer i % writers, so that every job's
    updates go through one connection, in order. Each writer has ``slots`` jobs in progress and
    takes them in turn (a job gets an update every slots x writers updates); a slot starts its next
    job when one is done. The slots start at phases spread over the sequence (their first job is
    created part-way through it), so that transitions are spread evenly from the first second.
    """

    rate: float
    writers: int
    slots: int
    path: JobPath
    total: int
    # Per update: (variant id, status, step, job id, transition it causes or None)
    updates: list[tuple[uuid.UUID, str, str, uuid.UUID, tuple[str, str | None] | None]] = field(default_factory=list)
    # Per job: its variants' ids and the phase it starts at (its initial state is the path's at that phase)
    jobs: dict[uuid.UUID, tuple[list[uuid.UUID], int]] = field(default_factory=dict)

    @classmethod
    def build(cls, *, rate: float, total: int, writers: int, slots: int, path: JobPath) -> Schedule:
        schedule = cls(rate, writers, slots, path, total)
        length = len(path.updates)
        in_slot: dict[tuple[int, int], tuple[int, uuid.UUID | None]] = {}  # slot -> (updates taken, current job)
        for i in range(total):
            w, k = i % writers, i // writers
            s, r = k % slots, k // slots
            phase = ((s * writers + w) * length) // (slots * writers)
            n = phase + r  # the slot's position in an endless sequence of jobs
            j, u = divmod(n, length)
            taken, job = in_slot.get((w, s), (-1, None))
            if job is None or taken != j:
                job = uuid.uuid4()
                start = phase if r == 0 else 0
                schedule.jobs[job] = ([uuid.uuid4() for _ in range(path.variants)], start)
                in_slot[(w, s)] = (j, job)
            variant, status, step = path.updates[u]
            schedule.updates.append((schedule.jobs[job][0][variant], status, step, job, path.transition_at(u)))
        return schedule

    def causes(self) -> dict[tuple[uuid.UUID, str, str | None], int]:
        """(job, to status, to step) -> the update that causes that transition."""
        return {(job, *to): i for i, (_, _, _, job, to) in enumerate(self.updates) if to is not None}

    def insert(self, conn: psycopg.Connection[Any]) -> None:
        """Every job and variant of the schedule, each in the state of its starting phase (captured as events)."""
        jobs = list(self.jobs)
        conn.execute(JOBS_SQL, {"jobs": jobs})
        ids: list[uuid.UUID] = []
        owners: list[uuid.UUID] = []
        statuses: list[str] = []
        steps: list[str | None] = []
        for job, (variants, phase) in self.jobs.items():
            for variant, (status, step) in zip(variants, self.path.variant_states(phase), strict=True):
                ids.append(variant)
                owners.append(job)
                statuses.append(status)
                steps.append(step)
        conn.execute(VARIANTS_SQL, {"ids": ids, "jobs": owners, "statuses": statuses, "steps": steps})

    def expected_states(self) -> dict[uuid.UUID, tuple[str, str | None]]:
        out = {}
        for job, (_, phase) in self.jobs.items():
            state = self.path.states[phase]
            out[job] = (str(state.status), state.current_step)
        return out


# The subscriber, in a process of its own (away from the writer threads' GIL)


def subscriber_child(url: str, name: str) -> None:
    """Run outbox.Subscriber until SIGTERM; print "ready" once active, then one JSON document."""
    import outbox
    import outbox.subscriber as subscriber_module
    from processor.wakeup import Waiter

    wakes: collections.Counter[str] = collections.Counter()

    class CountingWaiter(Waiter):  # why each of the subscriber's waits ended (notify, timeout)
        def wait(self, seconds: float) -> Any:
            wake = super().wait(seconds)
            wakes[str(wake)] += 1
            return wake

    subscriber_module.Waiter = CountingWaiter  # type: ignore[attr-defined]
    records: list[tuple[float, int, str, str, str | None, float, int]] = []

    def handler(_conn: Any, t: outbox.Transition) -> None:
        records.append(
            (
                time.time(),
                t.transition_id,
                str(t.job_id),
                t.to_status,
                t.to_step,
                t.transitioned_at.timestamp(),
                t.attempt,
            )
        )

    subscriber = outbox.Subscriber(name, url, handler)
    signal.signal(signal.SIGTERM, lambda *_: subscriber.stop())

    def announce() -> None:
        while not subscriber.active:
            time.sleep(0.01)
        print("ready", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    subscriber.run()
    print(json.dumps({"records": records, "wakes": dict(wakes), "delivered": subscriber.delivered}), flush=True)


class SubscriberProcess:
    def __init__(self, db: DatabaseUrl, name: str) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child-subscriber",
                db.url.render_as_string(hide_password=False),
                name,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        line = self.process.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.process.kill()
            _, err = self.process.communicate()
            raise RuntimeError(f"the subscriber did not start: {line!r} {err[-2000:]}")

    def stop(self) -> dict[str, Any]:
        self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=60)
        if self.process.returncode != 0:
            raise RuntimeError(f"the subscriber exited with {self.process.returncode}: {err[-2000:]}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result


# One measurement


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class RateRun:
    rate: float
    wakeup: str
    achieved: float  # updates / (last commit - schedule start)
    updates: int
    transitions_expected: int  # caused by the updates made (all of them, warm-up included)
    transitions_handled: int  # handler calls (all)
    transitions_measured: int  # after the warm-up
    missing: int  # expected, never handled (coalesced in one batch, or lost)
    unexpected: int  # handled, not expected (none should be)
    redelivered: int  # handler calls with attempt > 1, or a transition handled twice
    p50_ms: float
    p99_ms: float
    max_ms: float
    min_ms: float
    written_p50_ms: float  # writer's commit -> transition row written (the worker's part, DB clock)
    written_p99_ms: float
    handled_p50_ms: float  # transition row written -> handler called (worker's commit, NOTIFY, subscriber)
    handled_p99_ms: float
    lag_p99_ms: float  # how late the writers issued updates (every connection busy)
    transitions_per_second: float  # measured transitions / the time over which their causes committed
    catch_up_s: float  # from the writers' last commit to the last handler call
    subscriber_wakes: dict[str, int]
    worker_wakes: str


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """Poll other processes' progress (never to order a race)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
    return value


def open_loop(db: DatabaseUrl, schedule: Schedule) -> tuple[float, list[float], list[float]]:
    """Each writer issues its updates (i % writers) at start + i / rate, whatever the earlier ones took."""
    total, writers, rate = schedule.total, schedule.writers, schedule.rate
    committed = [0.0] * total
    late = [0.0] * total
    errors: list[BaseException] = []
    ready = threading.Barrier(writers + 1, timeout=60)
    start = 0.0
    pace = threading.Event()  # never set: waiting on it paces the schedule

    def write(w: int) -> None:
        try:
            with connect(db, application_name="outbox-bench-writer", autocommit=True) as conn:
                conn.execute("SELECT 1")
                ready.wait()
                ready.wait()  # start is set
                for i in range(w, total, writers):
                    if errors:
                        return
                    variant, status, step, _, _ = schedule.updates[i]
                    due = start + i / rate
                    pace.wait(max(0.0, due - time.monotonic()))
                    late[i] = time.monotonic() - due
                    conn.execute(UPDATE_SQL, [status, step, variant], prepare=True)
                    committed[i] = time.time()  # right after the commit returned (autocommit)
        except BaseException as exc:
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.monotonic() + 0.05
    start_wall = time.time() + 0.05
    ready.wait()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return start_wall, committed, late


def capacity_run(admin_url: DatabaseUrl, *, transitions: int) -> float:
    """Transitions/s one Subscriber (a handler that does nothing) delivers from a backlog, nothing else running.

    The backlog: ``transitions`` jobs of one queued variant, folded once by `outbox run` (one
    transition each) with the subscription created from the start; then the worker is stopped and
    ``Subscriber.run_until_idle`` is timed in this process.
    """
    import latency
    import run as run_module

    import outbox

    with (
        run_module.scratch_database(admin_url, f"{DATABASE}_capacity_{run_module.RUN_TAG}") as db,
        connect(db, application_name="outbox-bench") as conn,
    ):
        jobs = [uuid.uuid4() for _ in range(transitions)]
        conn.execute(JOBS_SQL, {"jobs": jobs})
        conn.execute(
            VARIANTS_SQL,
            {
                "ids": [uuid.uuid4() for _ in jobs],
                "jobs": jobs,
                "statuses": ["queued"] * len(jobs),
                "steps": [None] * len(jobs),
            },
        )
        subscriptions.create(conn, SUBSCRIPTION, from_start=True, to_statuses=None)
        worker = latency.WorkerProcess(db, "poll")
        try:

            def folded() -> bool:
                worker.check()
                row = conn.execute("SELECT count(*) FROM outbox_job_transitions").fetchone()
                return bool(row and row[0] == transitions and store.work_pending(conn) == 0)

            wait_until(folded, timeout=300, what="the worker to fold every job once")
        finally:
            worker.stop()
        conn.execute("VACUUM ANALYZE")
        handled = [0]

        def handler(_conn: Any, _t: Any) -> None:
            handled[0] += 1

        subscriber = outbox.Subscriber(SUBSCRIPTION, db.url.render_as_string(hide_password=False), handler)
        started = time.perf_counter()
        subscriber.run_until_idle()
        seconds = time.perf_counter() - started
    if handled[0] != transitions:
        raise RuntimeError(f"the subscriber handled {handled[0]} transitions of {transitions}")
    return transitions / seconds


def rate_run(
    admin_url: DatabaseUrl,
    *,
    rate: float,
    wakeup: str,
    seconds: float,
    warmup: float,
    writers: int,
    slots: int,
    variants: int,
) -> RateRun:
    import latency  # bench/latency.py: its `outbox run` subprocess
    import run as run_module  # bench/run.py: scratch databases

    path = JobPath.of(variants)
    total = math.ceil(rate * (warmup + seconds))
    schedule = Schedule.build(rate=rate, total=total, writers=writers, slots=slots, path=path)
    with (
        run_module.scratch_database(admin_url, f"{DATABASE}_{run_module.RUN_TAG}") as db,
        connect(db, application_name="outbox-bench") as conn,
    ):
        schedule.insert(conn)
        store.wakeup_trigger_set(conn, enabled=wakeup == "notify")
        worker = latency.WorkerProcess(db, wakeup)
        subscriber: SubscriberProcess | None = None
        try:

            def folded() -> bool:
                worker.check()
                row = conn.execute("SELECT count(*) FROM jobs WHERE current_step IS NOT NULL").fetchone()
                return bool(row and row[0] == len(schedule.jobs) and store.work_pending(conn) == 0)

            wait_until(folded, timeout=300, what="the worker to fold every job once")
            states = {row[0]: (row[1], row[2]) for row in conn.execute("SELECT job_id, status, current_step FROM jobs")}
            if states != schedule.expected_states():
                raise RuntimeError("the jobs' first states are not the ones the schedule expects")
            subscriptions.create(conn, SUBSCRIPTION, from_start=False, to_statuses=None)  # from now
            conn.execute("VACUUM ANALYZE")
            subscriber = SubscriberProcess(db, SUBSCRIPTION)
            start, committed, late = open_loop(db, schedule)

            def delivered() -> bool:
                worker.check()
                if subscriber is not None and subscriber.process.poll() is not None:
                    raise RuntimeError(f"the subscriber exited with {subscriber.process.returncode}")
                row = conn.execute(HEAD_SQL, {"name": SUBSCRIPTION}).fetchone()
                return bool(row and row[0] == row[1] and store.work_pending(conn) == 0)

            wait_until(delivered, timeout=1800, what="the subscriber to handle every transition")
            result = subscriber.stop()
            subscriber = None
        finally:
            if subscriber is not None:
                subscriber.process.kill()
                subscriber.process.wait()
            worker.stop()
        if worker.process.returncode != 0:
            raise RuntimeError(f"`outbox run` exited with {worker.process.returncode}:\n{worker.output[-2000:]}")
    return summarise(
        schedule,
        start,
        committed,
        late,
        result,
        rate=rate,
        wakeup=wakeup,
        warmup=warmup,
        worker_output=worker.output,
    )


def summarise(
    schedule: Schedule,
    start: float,
    committed: list[float],
    late: list[float],
    result: dict[str, Any],
    *,
    rate: float,
    wakeup: str,
    warmup: float,
    worker_output: str,
) -> RateRun:
    import re

    causes = schedule.causes()
    first = math.ceil(rate * warmup)  # the updates due after the warm-up
    latencies: list[float] = []
    written: list[float] = []
    handled: list[float] = []
    seen: set[tuple[uuid.UUID, str, str | None]] = set()
    causes_committed: list[float] = []
    unexpected = redelivered = 0
    for called, _tid, job, to_status, to_step, transitioned_at, attempt in result["records"]:
        key = (uuid.UUID(job), to_status, to_step)
        if attempt > 1 or key in seen:
            redelivered += 1
        seen.add(key)
        cause = causes.get(key)
        if cause is None:
            unexpected += 1
            continue
        if cause < first:
            continue
        causes_committed.append(committed[cause])
        latencies.append(called - committed[cause])
        written.append(transitioned_at - committed[cause])
        handled.append(called - transitioned_at)
    if not latencies:
        raise RuntimeError("no transition was measured")
    latencies.sort()
    written.sort()
    handled.sort()
    lags = sorted(late[first:])
    woke = re.search(r"woke up .*", worker_output)
    return RateRun(
        rate=rate,
        wakeup=wakeup,
        achieved=schedule.total / (max(committed) - start),
        updates=schedule.total,
        transitions_expected=len(causes),
        transitions_handled=len(result["records"]),
        transitions_measured=len(latencies),
        missing=len(set(causes) - seen),
        unexpected=unexpected,
        redelivered=redelivered,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        max_ms=latencies[-1] * 1000,
        min_ms=latencies[0] * 1000,
        written_p50_ms=percentile(written, 50) * 1000,
        written_p99_ms=percentile(written, 99) * 1000,
        handled_p50_ms=percentile(handled, 50) * 1000,
        handled_p99_ms=percentile(handled, 99) * 1000,
        lag_p99_ms=percentile(lags, 99) * 1000,
        transitions_per_second=len(latencies) / max(1e-9, max(causes_committed) - min(causes_committed)),
        catch_up_s=max(record[0] for record in result["records"]) - max(committed),
        subscriber_wakes=result["wakes"],
        worker_wakes=woke.group(0) if woke else "",
    )


# Machine and tree


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def tree_state() -> str:
    """The commit and a digest of the uncommitted changes measured (the tree may move while others work)."""
    import hashlib

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=ROOT, capture_output=True)
        untracked = subprocess.run(
            ["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True
        )
    except OSError:
        return "unknown"
    digest = hashlib.sha256(diff.stdout)
    for name in sorted(untracked.stdout.split(b"\0")):
        if name and not name.startswith(b"bench/"):
            digest.update(name + b"\0" + (ROOT / name.decode()).read_bytes())
    return f"{head.stdout.strip()} + uncommitted changes (sha256 {digest.hexdigest()[:12]})"


# Main


def measure(
    admin_url: DatabaseUrl,
    *,
    runs: int,
    seconds: float,
    rates: Sequence[float] = (500, 2000),
    wakeups: Sequence[str] = ("poll",),
    writers: int = 8,
    slots: int = 25,
    variants: int = 4,
    warmup: float = 2.0,
    capacity: int = 3000,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], list[RateRun]]:
    """Figures as flat keys (medians over ``runs``) and every run's result."""
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # a writer thread back from its commit takes its timestamp sooner
    measured: list[RateRun] = []
    capacities: list[float] = []
    try:
        for number in range(runs):
            if capacity:
                capacities.append(capacity_run(admin_url, transitions=capacity))
                log(
                    f"run {number + 1}, subscriber capacity: {capacity:,} transitions delivered from a backlog at "
                    f"{capacities[-1]:,.0f}/s"
                )
            for rate in rates:
                for wakeup in wakeups if number % 2 == 0 else wakeups[::-1]:  # alternate, against drift
                    r = rate_run(
                        admin_url,
                        rate=rate,
                        wakeup=wakeup,
                        seconds=seconds,
                        warmup=warmup,
                        writers=writers,
                        slots=slots,
                        variants=variants,
                    )
                    measured.append(r)
                    log(
                        f"run {number + 1}, {rate:g}/s, worker {wakeup}: achieved {r.achieved:,.0f} updates/s, "
                        f"{r.transitions_measured:,} transitions measured ({r.transitions_per_second:,.0f}/s; "
                        f"handled {r.transitions_handled:,} of {r.transitions_expected:,} expected, missing "
                        f"{r.missing}, unexpected {r.unexpected}, redelivered {r.redelivered}): p50 {r.p50_ms:.1f} ms, "
                        f"p99 {r.p99_ms:.1f} ms, max {r.max_ms:.1f} ms (min {r.min_ms:.1f}); commit -> written "
                        f"p50/p99 {r.written_p50_ms:.1f}/{r.written_p99_ms:.1f} ms, written -> handler "
                        f"{r.handled_p50_ms:.1f}/{r.handled_p99_ms:.1f} ms; last handler call "
                        f"{r.catch_up_s:.1f} s after the last commit; scheduler lag p99 {r.lag_p99_ms:.1f} ms; "
                        f"subscriber waits ended {r.subscriber_wakes}; worker {r.worker_wakes}"
                    )
    finally:
        sys.setswitchinterval(switch_interval)
    figures: dict[str, Any] = {}
    if capacities:
        figures["transition_subscriber_capacity_per_s"] = round(statistics.median(capacities))
        figures["transition_subscriber_capacity_runs"] = [round(c) for c in capacities]
    for rate in rates:
        for wakeup in wakeups:
            results = [r for r in measured if r.rate == rate and r.wakeup == wakeup]
            suffix = f"{rate:g}_per_s_{wakeup}"
            for name in (
                "p50_ms",
                "p99_ms",
                "max_ms",
                "written_p50_ms",
                "written_p99_ms",
                "handled_p50_ms",
                "handled_p99_ms",
                "lag_p99_ms",
                "catch_up_s",
            ):
                figures[f"transition_latency_{name}_{suffix}"] = round(
                    statistics.median(getattr(r, name) for r in results), 1
                )
            figures[f"transition_achieved_per_s_{suffix}"] = round(statistics.median(r.achieved for r in results))
            figures[f"transition_handled_{suffix}"] = round(statistics.median(r.transitions_handled for r in results))
            figures[f"transition_measured_{suffix}"] = round(statistics.median(r.transitions_measured for r in results))
            figures[f"transition_missing_max_{suffix}"] = max(r.missing + r.unexpected for r in results)
    return figures, measured


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--child-subscriber"]:
        subscriber_child(args_list[1], args_list[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="500,2000", help="offered variant updates per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=25, help="measured window per rate and run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the window (left out)")
    parser.add_argument("--runs", type=int, default=3, help="runs (the median of each figure is reported)")
    parser.add_argument("--wakeup", default="poll,notify", help="the worker's OUTBOX_WAKEUP values, comma-separated")
    parser.add_argument("--writers", type=int, default=8, help="writer connections of the open loop")
    parser.add_argument("--slots", type=int, default=25, help="jobs in progress per writer")
    parser.add_argument("--variants", type=int, default=4, help="variants per job")
    parser.add_argument(
        "--capacity", type=int, default=3000, help="transitions of the subscriber-capacity backlog per run (0: none)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(args_list)
    rates = [float(r) for r in args.rates.split(",")]
    wakeups = [w.strip() for w in args.wakeup.split(",") if w.strip()]
    if set(wakeups) - set(WAKEUPS) or not wakeups:
        parser.error(f"--wakeup takes {', '.join(WAKEUPS)}")
    console = Console(stderr=args.json, soft_wrap=True)
    if not console.is_terminal:
        console = Console(stderr=args.json, soft_wrap=True, width=200)  # a log file: no wrapping of the table
    import run as run_module

    admin_url = run_module.server()
    machine = run_module.machine(admin_url)
    machine["cpu"] = cpu_model()
    machine["tree"] = tree_state()
    command = shlex.join([Path(sys.executable).name, "bench/transition_latency.py", *args_list])
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    figures, measured = measure(
        admin_url,
        runs=args.runs,
        seconds=args.seconds,
        rates=rates,
        wakeups=wakeups,
        writers=args.writers,
        slots=args.slots,
        variants=args.variants,
        warmup=args.warmup,
        capacity=args.capacity,
        log=console.print,
    )
    machine["load_average_at_end"] = [round(load, 2) for load in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    document = {
        "command": command,
        "started_at": started_at,
        "machine": machine,
        "options": vars(args),
        "figures": figures,
        "runs": [asdict(r) for r in measured],
    }
    (RESULTS / "transition_latency.json").write_text(json.dumps(document, indent=2) + "\n")
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    title = (
        f"job transitions, writer's commit -> subscriber's handler (medians of {args.runs} runs of "
        f"{args.seconds:g} s; {args.writers} writers, {args.variants} variants per job)"
    )
    table = Table(
        "offered/s",
        "worker wake-up",
        "achieved/s",
        "transitions handled",
        "p50 ms",
        "p99 ms",
        "max ms",
        "commit->written p50/p99",
        "written->handler p50/p99",
        "sched. lag p99 ms",
        "last call after last commit s",
        title=title,
        title_justify="left",
    )
    for rate in rates:
        for wakeup in wakeups:
            s = f"{rate:g}_per_s_{wakeup}"
            table.add_row(
                f"{rate:g}",
                wakeup,
                f"{figures[f'transition_achieved_per_s_{s}']:,}",
                f"{figures[f'transition_handled_{s}']:,} ({figures[f'transition_measured_{s}']:,} measured)",
                f"{figures[f'transition_latency_p50_ms_{s}']}",
                f"{figures[f'transition_latency_p99_ms_{s}']}",
                f"{figures[f'transition_latency_max_ms_{s}']}",
                f"{figures[f'transition_latency_written_p50_ms_{s}']} / "
                f"{figures[f'transition_latency_written_p99_ms_{s}']}",
                f"{figures[f'transition_latency_handled_p50_ms_{s}']} / "
                f"{figures[f'transition_latency_handled_p99_ms_{s}']}",
                f"{figures[f'transition_latency_lag_p99_ms_{s}']}",
                f"{figures[f'transition_latency_catch_up_s_{s}']}",
            )
    console.print(table)
    if "transition_subscriber_capacity_per_s" in figures:
        console.print(
            f"subscriber capacity (a backlog of {args.capacity:,} transitions, handler doing nothing, nothing else "
            f"running): {figures['transition_subscriber_capacity_per_s']:,} transitions/s "
            f"(runs {figures['transition_subscriber_capacity_runs']})"
        )
    console.print(
        f"machine: {machine['cores']} cores ({machine['cpu']}), PostgreSQL {machine['postgresql']}, Python "
        f"{machine['python']}, psycopg {machine['psycopg']} ({machine['platform']}); load average "
        f"{machine['load_average_at_start']} at start, {machine['load_average_at_end']} at end"
    )
    console.print(f"tree: {machine['tree']}")
    console.print(f"command: {command}")
    console.print(f"written {RESULTS / 'transition_latency.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
