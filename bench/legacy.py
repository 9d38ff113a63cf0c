"""Against the legacy trigger: writer throughput, stuck jobs, and completion latency with the sweep.

    python bench/legacy.py [--runs 3] [--sweep-interval 60] [--seconds 5]

Three comparisons between the legacy aggregation trigger (tests/sql/legacy_schema.sql, nothing
else) and this product (a database migrated with processor.migrate.migrate, `outbox run` running
as a subprocess, as in production), each on scratch databases of the server of
OUTBOX_BENCH_DATABASE_URL (or OUTBOX_TEST_DATABASE_URL), else the embedded server:

1. writer throughput at 3, 30 and 300 variants per job (same total of variants), with no trigger
   as the base;
2. stuck jobs after the variants of each job are finished in concurrent transactions, checked
   against the jobs' variants;
3. the time from the commit of a job's last variant to the job showing 'done', with the legacy
   recovery sweep running every --sweep-interval seconds (so a run lasts a little longer than that).

bench/README.md ("Against the legacy trigger") describes the method. Benchmarks print figures;
tests never assert timings.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from processor import store
from processor.database import DatabaseUrl, connect

ROOT = Path(__file__).resolve().parents[1]
LEGACY_SCHEMA = (ROOT / "tests" / "sql" / "legacy_schema.sql").read_text()
STEPS = ("ingest", "detect", "segment", "iou_eval")  # bench/run.py's pipeline
FINAL = STEPS[-1]
VARIANTS_PER_JOB = (3, 30, 300)
TOTAL_VARIANTS = 30_000  # the throughput tables hold this many variants whatever the job size
SEED = 5

# The legacy system's periodic repair: every job whose variants are all done becomes done.
SWEEP_SQL = """
UPDATE jobs AS j SET status = 'done', updated_at = now()
WHERE j.status IS DISTINCT FROM 'done'
  AND EXISTS (SELECT FROM jobs_variants AS v WHERE v.job_id = j.job_id)
  AND NOT EXISTS (SELECT FROM jobs_variants AS v WHERE v.job_id = j.job_id AND v.status IS DISTINCT FROM 'done')
"""
SWEEP_APPLICATION = "bench-legacy-sweep"

# The independent reference: a job is done when all its variants are done. Counts the jobs that
# are finished by that definition, those of them not 'done' in jobs (stuck), and the jobs 'done'
# in jobs that are not finished (wrong; 0 for both systems).
REFERENCE_SQL = """
SELECT count(*) FILTER (WHERE r.finished),
       count(*) FILTER (WHERE r.finished AND j.status IS DISTINCT FROM 'done'),
       count(*) FILTER (WHERE NOT r.finished AND j.status = 'done')
FROM (SELECT job_id, bool_and(status = 'done') AS finished FROM jobs_variants GROUP BY job_id) AS r
JOIN jobs AS j USING (job_id)
"""

# A bench-only observer, the same for both systems: when and by whom each job became 'done'. The
# time is taken in the transaction that writes the job, just before it commits.
OBSERVER_SQL = """
CREATE TABLE bench_job_done (job_id uuid NOT NULL, at timestamptz NOT NULL, writer text NOT NULL);
CREATE FUNCTION bench_job_done_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_job_done VALUES (NEW.job_id, clock_timestamp(), current_setting('application_name'));
    RETURN NULL;
END $$;
CREATE TRIGGER bench_job_done_record AFTER UPDATE ON jobs FOR EACH ROW
    WHEN (NEW.status = 'done' AND OLD.status IS DISTINCT FROM 'done')
    EXECUTE FUNCTION bench_job_done_record();
"""

FINISH_SQL = "UPDATE jobs_variants SET status = 'done', current_step = %s WHERE job_variants_id = %s"
UPDATE_SQL = "UPDATE jobs_variants SET status = %s, current_step = %s WHERE job_variants_id = %s"


@dataclass(frozen=True)
class Job:
    job_id: uuid.UUID
    variants: tuple[uuid.UUID, ...]


def _run_module() -> ModuleType:
    """bench/run.py, imported when first needed (bench/ is on sys.path when a bench script runs)."""
    try:
        return importlib.import_module("run")
    except ModuleNotFoundError:
        return importlib.import_module("bench.run")


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def make_jobs(rng: random.Random, jobs: int, variants: int) -> list[Job]:
    return [Job(_uuid(rng), tuple(_uuid(rng) for _ in range(variants))) for _ in range(jobs)]


def load_jobs(conn: psycopg.Connection[Any], jobs: Sequence[Job], *, step: str) -> None:
    """Jobs and their variants, all 'running' at ``step`` (captured as inserts on the product's database)."""
    with conn.cursor() as cur:
        with cur.copy("COPY jobs (job_id, status, current_step) FROM STDIN") as copy:
            for job in jobs:
                copy.write_row((job.job_id, "running", step))
        with cur.copy("COPY jobs_variants (job_variants_id, job_id, status, current_step) FROM STDIN") as copy:
            for job in jobs:
                for variant in job.variants:
                    copy.write_row((variant, job.job_id, "running", step))
    conn.execute("VACUUM ANALYZE jobs, jobs_variants")


def legacy_database(admin_url: DatabaseUrl, name: str) -> DatabaseUrl:
    """A scratch database with the legacy schema and trigger, nothing else."""
    with connect(admin_url, application_name="outbox-bench") as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    db = DatabaseUrl(admin_url.url.set(database=name))
    with connect(db, application_name="outbox-bench") as conn:
        conn.execute(LEGACY_SCHEMA.encode())
    return db


@contextlib.contextmanager
def scratch_databases(admin_url: DatabaseUrl) -> Iterator[Callable[[str, str], DatabaseUrl]]:
    """``create(name, "legacy" | "outbox")`` for a scratch database, all dropped on the way out."""
    names: list[str] = []

    def create(name: str, kind: str) -> DatabaseUrl:
        names.append(name)
        return _run_module().fresh_database(admin_url, name) if kind == "outbox" else legacy_database(admin_url, name)

    try:
        yield create
    finally:
        with connect(admin_url, application_name="outbox-bench") as admin:
            for name in names:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """Poll another process's progress (the worker's), never to order a race."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
    return value


class WorkerProcess:
    """`outbox run` on ``db`` as a subprocess, its output in a temporary file."""

    def __init__(self, db: DatabaseUrl) -> None:
        self.db = db
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        env = {
            **os.environ,
            "OUTBOX_DATABASE_URL": db.url.render_as_string(hide_password=False),
            "OUTBOX_PIPELINE_STEPS": ",".join(STEPS),
            "OUTBOX_LOG_LEVEL": "WARNING",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "processor.cli", "run"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def check(self) -> None:
        if self.process.poll() is not None:
            self._log.seek(0)
            output = self._log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"`outbox run` exited with {self.process.returncode}:\n{output}")

    def wait_drained(self, conn: psycopg.Connection[Any], timeout: float = 120) -> None:
        """Until this worker holds the partition and has applied everything committed."""

        def drained() -> bool:
            self.check()
            return store.consumer_lock_holder(conn, 0) is not None and store.work_pending(conn, 0) == 0

        wait_until(drained, timeout=timeout, what="the worker to drain")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # finish the batch in hand, exit 0
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@contextlib.contextmanager
def running_worker(db: DatabaseUrl) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(db)
    try:
        yield worker
    finally:
        worker.stop()


# 1. Writer throughput

# none: no trigger; legacy: the trigger as given; legacy_indexed: with an index on jobs_variants(job_id);
# outbox: migrated, `outbox run` running; capture_only: migrated, no worker (where the cost goes).
SYSTEMS = ("none", "legacy", "legacy_indexed", "outbox", "capture_only")
MIGRATED = ("outbox", "capture_only")  # databases migrated with processor.migrate
WRITER_KEYS = {
    "none": "no_trigger",
    "legacy": "legacy",
    "legacy_indexed": "legacy_indexed",
    "outbox": "outbox",
    "capture_only": "outbox_capture_only",
}
SLICE_SECONDS = 1.0  # the window of each system is cut into slices, taken in turn


def writer_slice(
    conns: Sequence[psycopg.Connection[Any]], variants: Sequence[uuid.UUID], *, seconds: float, seed: str
) -> tuple[int, float]:
    """Single-variant update transactions from one thread per autocommit connection: (count, seconds)."""
    counts = [0] * len(conns)
    errors: list[BaseException] = []
    start = threading.Barrier(len(conns) + 1, timeout=60)
    stop = threading.Event()

    def write(index: int) -> None:
        rng = random.Random(f"{seed}-{index}")  # the same sequence of updates for every system
        try:
            start.wait()
            while not stop.is_set():
                status, step, variant = rng.choice(("running", "done")), rng.choice(STEPS), rng.choice(variants)
                conns[index].execute(UPDATE_SQL, [status, step, variant])
                counts[index] += 1
        except BaseException as exc:
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(conns))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    stop.wait(seconds)  # the measurement window, not synchronisation
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    return sum(counts), elapsed


def throughput_databases(
    create: Callable[[str, str], DatabaseUrl], per_job: int, jobs: Sequence[Job]
) -> dict[str, DatabaseUrl]:
    """The same jobs in a database per system of SYSTEMS."""
    dbs = {
        system: create(f"outbox_bench_legacy_{per_job}_{system}", "outbox" if system in MIGRATED else "legacy")
        for system in SYSTEMS
    }
    for system, db in dbs.items():
        with connect(db, application_name="outbox-bench") as conn:
            if system == "none":
                conn.execute("DROP TRIGGER check_all_variants_done_trigger ON jobs_variants")
            if system == "legacy_indexed":
                # The schema as given has no index on jobs_variants(job_id), so the trigger's count
                # reads the whole table; the product's migrate adds one. The trigger with it:
                conn.execute("CREATE INDEX bench_jobs_variants_job_id_idx ON jobs_variants (job_id)")
            load_jobs(conn, jobs, step=STEPS[0])
    return dbs


def throughput_run(
    admin_url: DatabaseUrl, per_job: int, *, run: int, seconds: float, writers: int, log: Callable[[str], None]
) -> dict[str, float]:
    """tx/s of each system, and the outbox's backlog at the end of its slices (max, events)."""
    jobs = make_jobs(random.Random(SEED * 100 + per_job), TOTAL_VARIANTS // per_job, per_job)
    variants = [variant for job in jobs for variant in job.variants]
    slices = max(1, round(seconds / SLICE_SECONDS))
    counts = dict.fromkeys(SYSTEMS, 0)
    elapsed = dict.fromkeys(SYSTEMS, 0.0)
    backlog = 0
    with contextlib.ExitStack() as stack:
        dbs = throughput_databases(stack.enter_context(scratch_databases(admin_url)), per_job, jobs)
        worker = stack.enter_context(running_worker(dbs["outbox"]))
        observer = stack.enter_context(connect(dbs["outbox"], application_name="outbox-bench"))
        worker.wait_drained(observer)  # the inserts
        conns = {
            system: [
                stack.enter_context(connect(db, application_name="outbox-bench-writer", autocommit=True))
                for _ in range(writers)
            ]
            for system, db in dbs.items()
        }
        for index in range(slices):
            # Systems take turns, in a rotating order, so that a change in the machine's load
            # (others' benchmarks) hits all of them alike.
            shift = (run + index) % len(SYSTEMS)
            for system in SYSTEMS[shift:] + SYSTEMS[:shift]:
                done, took = writer_slice(
                    conns[system], variants, seconds=seconds / slices, seed=f"{SEED}-{run}-{index}"
                )
                counts[system] += done
                elapsed[system] += took
                if system == "outbox":
                    # The worker applied events during the slice; what it had not applied yet is
                    # caught up outside the other systems' slices.
                    worker.check()
                    backlog = max(backlog, store.work_pending(observer, 0))
                    worker.wait_drained(observer)
    rates: dict[str, float] = {system: counts[system] / elapsed[system] for system in SYSTEMS}
    log(
        f"{per_job} variants/job: "
        + ", ".join(f"{system} {rate:,.0f}" for system, rate in rates.items())
        + f" tx/s; outbox backlog at the end of a slice at most {backlog:,} events"
    )
    return {**rates, "outbox_backlog": backlog}


# 2 and 3. Concurrent completions


def finish_jobs(
    db: DatabaseUrl, jobs: Sequence[Job], *, schedule: Sequence[float] | None = None, name: str
) -> dict[uuid.UUID, float]:
    """Finish every variant in its own transaction, one thread per variant of a job.

    For each job the threads meet at a barrier and then each commits its variant, so the last
    variants of the job commit together. With ``schedule`` (time.monotonic() values, one per job)
    each job starts at its time, spreading completions like production. Returns, per job, the
    time.time() at which the commit of its last variant returned.
    """
    width = len(jobs[0].variants)
    barrier = threading.Barrier(width, timeout=60)
    committed: list[dict[uuid.UUID, float]] = [{} for _ in range(width)]
    errors: list[BaseException] = []

    def finish(slot: int) -> None:
        try:
            with connect(db, application_name=f"{name}-{slot}", autocommit=False) as conn:
                for index, job in enumerate(jobs):
                    if schedule is not None:
                        # The arrival schedule, not synchronisation: the barrier lines the variants up.
                        time.sleep(max(0.0, schedule[index] - time.monotonic()))
                    barrier.wait()  # line the job's variants up: no sleep decides the interleaving
                    conn.execute(FINISH_SQL, [FINAL, job.variants[slot]])
                    conn.commit()
                    committed[slot][job.job_id] = time.time()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=finish, args=(slot,)) for slot in range(width)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return {job.job_id: max(slot[job.job_id] for slot in committed) for job in jobs}


def reference_counts(conn: psycopg.Connection[Any]) -> tuple[int, int, int]:
    """(finished by the reference, of them not 'done' in jobs, 'done' in jobs but not finished)."""
    row = conn.execute(REFERENCE_SQL).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def stuck_run(
    admin_url: DatabaseUrl, *, run: int, jobs_count: int, per_job: int, log: Callable[[str], None]
) -> dict[str, tuple[int, int, int]]:
    """Reference counts after finishing all jobs concurrently: legacy (no sweep), outbox (worker drained)."""
    jobs = make_jobs(random.Random(SEED * 200 + run), jobs_count, per_job)
    counts = {}
    with scratch_databases(admin_url) as create:
        legacy = create("outbox_bench_legacy_stuck", "legacy")
        with connect(legacy, application_name="outbox-bench") as conn:
            load_jobs(conn, jobs, step=FINAL)
            finish_jobs(legacy, jobs, name="bench-legacy-writer")
            counts["legacy"] = reference_counts(conn)  # no sweep has run: what the trigger left
        product = create("outbox_bench_legacy_stuck_outbox", "outbox")
        with running_worker(product) as worker, connect(product, application_name="outbox-bench") as conn:
            load_jobs(conn, jobs, step=FINAL)
            worker.wait_drained(conn)
            finish_jobs(product, jobs, name="bench-outbox-writer")
            worker.wait_drained(conn)
            counts["outbox"] = reference_counts(conn)
    for system, (finished, stuck, wrong) in counts.items():
        log(f"stuck, {system}: {stuck} of {finished} finished jobs not done ({wrong} done but not finished)")
    return counts


def sweeper(db: DatabaseUrl, start: float, interval: float, stop: threading.Event, errors: list[BaseException]) -> None:
    """The legacy recovery sweep, at start + k * interval (k >= 1) until stopped."""
    try:
        with connect(db, application_name=SWEEP_APPLICATION, autocommit=True) as conn:
            tick = 1
            while not stop.wait(max(0.0, start + tick * interval - time.monotonic())):
                conn.execute(SWEEP_SQL)
                tick += 1
    except BaseException as exc:
        errors.append(exc)


@dataclass
class Latencies:
    seconds: list[float]  # per job, from the commit of its last variant to the job showing 'done'
    by_sweep: int  # jobs the sweep marked done
    never: int  # jobs still not done at the end of the wait


def latency_run(
    admin_url: DatabaseUrl, *, run: int, jobs_count: int, per_job: int, interval: float, log: Callable[[str], None]
) -> dict[str, Latencies]:
    """Completion latency of both systems, side by side, with completions spread over one sweep interval."""
    rng = random.Random(SEED * 300 + run)
    jobs = make_jobs(rng, jobs_count, per_job)
    offsets = sorted(rng.uniform(0, interval) for _ in jobs)
    stop = threading.Event()
    errors: list[BaseException] = []
    committed: dict[str, dict[uuid.UUID, float]] = {}
    results: dict[str, Latencies] = {}
    with contextlib.ExitStack() as stack:
        create = stack.enter_context(scratch_databases(admin_url))
        dbs = {system: create(f"outbox_bench_legacy_latency_{system}", system) for system in ("legacy", "outbox")}
        for db in dbs.values():
            with connect(db, application_name="outbox-bench") as conn:
                conn.execute(OBSERVER_SQL)
                load_jobs(conn, jobs, step=FINAL)
        worker = stack.enter_context(running_worker(dbs["outbox"]))
        with connect(dbs["outbox"], application_name="outbox-bench") as conn:
            worker.wait_drained(conn)
        # The sweep runs at start + k * interval; the jobs finish at start + offset, offset uniform
        # in [0, interval), as if completions arrived at random moments of the sweep's cycle.
        start = time.monotonic() + 1.0  # the writers connect meanwhile
        schedule = [start + offset for offset in offsets]

        def write(system: str) -> None:
            try:
                committed[system] = finish_jobs(dbs[system], jobs, schedule=schedule, name=f"bench-{system}-writer")
            except BaseException as exc:
                errors.append(exc)

        sweep = threading.Thread(target=sweeper, args=(dbs["legacy"], start, interval, stop, errors))
        sweep.start()
        stack.callback(sweep.join)
        stack.callback(stop.set)
        writers = [threading.Thread(target=write, args=(system,)) for system in dbs]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
        if errors:
            raise errors[0]
        for system, db in dbs.items():
            with connect(db, application_name="outbox-bench") as observer:
                # A job the legacy trigger left stuck waits for the next sweep (for the one after,
                # if its last variant committed while a sweep ran); a job never done is counted.
                with contextlib.suppress(RuntimeError):
                    wait_until(
                        lambda observer=observer: reference_counts(observer)[1] == 0 or errors,
                        timeout=2 * interval + 30,
                        what=f"{system} jobs to be done",
                    )
                if errors:
                    raise errors[0]
                if system == "outbox":
                    worker.check()
                results[system] = _latencies(observer, committed[system])
    for system, found in results.items():
        log(
            f"latency, {system}: p50 {_ms(percentile(found.seconds, 50))} ms, max {_ms(max(found.seconds, default=0))}"
            f" ms; {found.by_sweep} of {len(jobs)} by the sweep, {found.never} never done"
        )
    return results


def _latencies(conn: psycopg.Connection[Any], committed: dict[uuid.UUID, float]) -> Latencies:
    rows = conn.execute(
        "SELECT job_id, max(at), bool_or(writer = %s) FROM bench_job_done GROUP BY job_id", [SWEEP_APPLICATION]
    ).fetchall()
    done: dict[uuid.UUID, tuple[dt.datetime, bool]] = {row[0]: (row[1], row[2]) for row in rows}
    # The observer's time is taken just before the commit that makes the job done; a job the
    # writer's own transaction marks done (the legacy trigger) therefore shows a few microseconds
    # below 0, which counts as 0.
    seconds = [max(0.0, done[job][0].timestamp() - at) for job, at in committed.items() if job in done]
    by_sweep = sum(1 for job in committed if job in done and done[job][1])
    return Latencies(seconds=seconds, by_sweep=by_sweep, never=sum(1 for job in committed if job not in done))


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def measure(
    admin_url: DatabaseUrl,
    *,
    runs: int,
    sweep_interval: float = 60.0,
    seconds: float = 5.0,
    writers: int = 4,
    stuck_jobs: int = 200,
    variants_per_stuck_job: int = 3,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The comparison with the legacy trigger, as flat figures (medians over ``runs`` where per run)."""
    say = log or (lambda _message: None)
    results: dict[str, Any] = {
        "legacy_bench_runs": runs,
        "legacy_bench_writer_seconds": seconds,
        "legacy_bench_writers": writers,
        "legacy_bench_total_variants": TOTAL_VARIANTS,
        "legacy_bench_sweep_interval_seconds": sweep_interval,
        "legacy_bench_worker": "outbox run (subprocess)",
    }
    rates: dict[int, list[dict[str, float]]] = {size: [] for size in VARIANTS_PER_JOB}
    stuck: list[dict[str, tuple[int, int, int]]] = []
    latencies: list[dict[str, Latencies]] = []
    for run in range(runs):
        for size in VARIANTS_PER_JOB:
            rates[size].append(throughput_run(admin_url, size, run=run, seconds=seconds, writers=writers, log=say))
        stuck.append(stuck_run(admin_url, run=run, jobs_count=stuck_jobs, per_job=variants_per_stuck_job, log=say))
        latencies.append(
            latency_run(
                admin_url,
                run=run,
                jobs_count=stuck_jobs,
                per_job=variants_per_stuck_job,
                interval=sweep_interval,
                log=say,
            )
        )

    for size in VARIANTS_PER_JOB:
        per_run = rates[size]
        for system, key in WRITER_KEYS.items():
            results[f"{key}_writer_tx_per_second_{size}_variants"] = round(
                statistics.median(r[system] for r in per_run)
            )
        # Ratios: the median of each run's ratio (the systems of a run took turns under the same load).
        for system in ("outbox", "capture_only"):
            for base in ("legacy", "legacy_indexed", "none"):
                ratio = statistics.median(r[system] / r[base] for r in per_run)
                results[f"writer_ratio_{WRITER_KEYS[system]}_over_{WRITER_KEYS[base]}_{size}_variants"] = round(
                    ratio, 2
                )
        results[f"outbox_backlog_max_events_{size}_variants"] = max(round(r["outbox_backlog"]) for r in per_run)

    results["stuck_test_jobs"] = stuck_jobs
    results["stuck_test_variants_per_job"] = variants_per_stuck_job
    for system in ("legacy", "outbox"):
        finished, left, wrong = zip(*(counts[system] for counts in stuck), strict=True)
        # The legacy trigger's typical run (median); for the product any stuck job counts (worst run).
        results[f"stuck_jobs_{system}"] = statistics.median(left) if system == "legacy" else max(left)
        results[f"stuck_jobs_{system}_per_run"] = list(left)
        # Checks against the reference: every job finished, none 'done' before all its variants.
        results[f"stuck_test_finished_jobs_{system}_per_run"] = list(finished)
        results[f"wrongly_done_jobs_{system}"] = max(wrong)

    for system, label in (("legacy", "legacy_sweep"), ("outbox", "outbox")):
        pooled = [value for run in latencies for value in run[system].seconds]
        for pct in (50, 99):
            results[f"completion_latency_p{pct}_ms_{label}"] = _ms(percentile(pooled, pct))
        results[f"completion_latency_max_ms_{label}"] = _ms(max(pooled, default=0.0))
        total = sum(len(run[system].seconds) + run[system].never for run in latencies)
        results[f"completion_waited_for_sweep_share_{label}"] = round(
            sum(run[system].by_sweep for run in latencies) / total, 3
        )
        results[f"completion_never_done_{label}"] = sum(run[system].never for run in latencies)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (the median is reported)")
    parser.add_argument("--sweep-interval", type=float, default=60.0, help="seconds between legacy recovery sweeps")
    parser.add_argument("--seconds", type=float, default=5.0, help="writer throughput window per measurement")
    parser.add_argument("--writers", type=int, default=4, help="writer connections for the throughput")
    parser.add_argument("--jobs", type=int, default=200, help="jobs finished concurrently (stuck jobs, latency)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    args = parser.parse_args()
    run = _run_module()
    console = Console(stderr=args.json)
    admin_url = run.server()
    machine = run.machine(admin_url)  # before: the load average at the start, where run.py records it
    figures = measure(
        admin_url,
        runs=args.runs,
        sweep_interval=args.sweep_interval,
        seconds=args.seconds,
        writers=args.writers,
        stuck_jobs=args.jobs,
        log=console.print,
    )
    if args.json:
        import json

        print(json.dumps({"machine": machine, **figures}, indent=2))
        return
    console.print(
        f"{machine['cores']} cores, PostgreSQL {machine['postgresql']}, Python {machine['python']}, "
        f"psycopg {machine['psycopg']}, load average at start {machine.get('load_average_at_start', '?')}; "
        f"{args.runs} run(s), sweep every {args.sweep_interval:g} s, "
        f"{args.writers} writers x {args.seconds:g} s windows, {TOTAL_VARIANTS:,} variants"
    )
    sizes = [f"{size} variants/job" for size in VARIANTS_PER_JOB]
    throughput = Table("writer tx/s", *sizes, title="writers (median of runs)", title_justify="left")
    rows = [
        ("no trigger", "no_trigger_writer_tx_per_second_{}_variants"),
        ("legacy trigger (schema as given)", "legacy_writer_tx_per_second_{}_variants"),
        ("legacy trigger + index on job_id", "legacy_indexed_writer_tx_per_second_{}_variants"),
        ("outbox, `outbox run` running", "outbox_writer_tx_per_second_{}_variants"),
        ("outbox capture, no worker", "outbox_capture_only_writer_tx_per_second_{}_variants"),
        ("outbox / legacy", "writer_ratio_outbox_over_legacy_{}_variants"),
        ("outbox / legacy + index", "writer_ratio_outbox_over_legacy_indexed_{}_variants"),
        ("outbox / no trigger", "writer_ratio_outbox_over_no_trigger_{}_variants"),
        ("capture / legacy + index", "writer_ratio_outbox_capture_only_over_legacy_indexed_{}_variants"),
        ("capture / no trigger", "writer_ratio_outbox_capture_only_over_no_trigger_{}_variants"),
        ("outbox backlog after a slice, max", "outbox_backlog_max_events_{}_variants"),
    ]
    for label, key in rows:
        throughput.add_row(label, *(f"{figures[key.format(size)]:,}" for size in VARIANTS_PER_JOB))
    console.print(throughput)
    outcome = Table("", "legacy trigger + sweep", "outbox", title="concurrent completions", title_justify="left")
    outcome.add_row(
        f"stuck jobs of {args.jobs} (legacy: median, outbox: worst run; per run)",
        f"{figures['stuck_jobs_legacy']} {figures['stuck_jobs_legacy_per_run']}",
        f"{figures['stuck_jobs_outbox']} {figures['stuck_jobs_outbox_per_run']}",
    )
    for name, key in (("p50", "p50_ms"), ("p99", "p99_ms"), ("max", "max_ms")):
        outcome.add_row(
            f"completion latency {name}, ms",
            f"{figures[f'completion_latency_{key}_legacy_sweep']:,}",
            f"{figures[f'completion_latency_{key}_outbox']:,}",
        )
    outcome.add_row(
        "share of jobs that waited for the sweep",
        f"{figures['completion_waited_for_sweep_share_legacy_sweep']:.1%}",
        f"{figures['completion_waited_for_sweep_share_outbox']:.1%}",
    )
    outcome.add_row(
        "never done / done too early",
        f"{figures['completion_never_done_legacy_sweep']} / {figures['wrongly_done_jobs_legacy']}",
        f"{figures['completion_never_done_outbox']} / {figures['wrongly_done_jobs_outbox']}",
    )
    console.print(outcome)


if __name__ == "__main__":
    main()
