"""Latency from a writer's commit to the job state in `jobs`, polling versus NOTIFY; what NOTIFY costs writers.

    python bench/latency.py [--loads 500,2000] [--seconds 20] [--runs 3] [--writers 8] [--json]

1. Latency at fixed offered loads (variant updates per second), for each wake-up (OUTBOX_WAKEUP
   poll, and notify with the trigger of `outbox migrate --wakeup notify`): an open-loop scheduler
   issues autocommit single-variant updates at the offered rate from several writer connections,
   whatever the earlier ones took, while `outbox run` runs as a subprocess. Each update moves a job
   of one variant to a state it never had before; a bench-only trigger on `jobs` records when the
   worker wrote each job state. Latency = that time minus the time.time() at which the writer's
   commit returned. p50, p99 and max, the achieved rate, and how late the scheduler issued updates.
2. Writer throughput (closed loop, as bench/run.py's writer_rate) with the notify trigger enabled
   and disabled, and their ratio.

Scratch databases on the server of OUTBOX_BENCH_DATABASE_URL (or OUTBOX_TEST_DATABASE_URL), else
the embedded server; figures are medians of --runs runs. bench/README.md ("Latency and wake-up")
describes the method. Benchmarks print figures; tests never assert timings.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from processor import store
from processor.database import DatabaseUrl, connect

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("ingest", "detect", "segment", "iou_eval")  # bench/run.py's pipeline
MODES = ("poll", "notify")
DATABASE = "outbox_bench_latency"
SEED = 5

# Jobs of one variant each, queued; the worker folds them to (queued, ingest) before the window.
JOBS_SQL = """
INSERT INTO jobs (job_id, status) SELECT gen_random_uuid(), 'queued' FROM generate_series(1, %(jobs)s);
INSERT INTO jobs_variants (job_variants_id, job_id, status) SELECT gen_random_uuid(), job_id, 'queued' FROM jobs;
"""
# The measured update: each job gets exactly one, so (running, detect) is the state that reflects it.
MOVE_SQL = "UPDATE jobs_variants SET status = 'running', current_step = 'detect' WHERE job_variants_id = %s"
MOVED = ("running", "detect")

# A bench-only observer: each job state the worker writes, with clock_timestamp() taken in the
# worker's transaction just before it commits (the state is visible to readers at that commit).
OBSERVER_SQL = """
CREATE TABLE bench_job_seen (job_id uuid NOT NULL, status text, current_step text, at timestamptz NOT NULL);
CREATE FUNCTION bench_job_seen_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_job_seen VALUES (NEW.job_id, NEW.status, NEW.current_step, clock_timestamp());
    RETURN NULL;
END $$;
CREATE TRIGGER bench_job_seen_record AFTER UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION bench_job_seen_record();
"""
FOLDED_SQL = "SELECT count(*) FROM jobs WHERE current_step IS NOT NULL"  # every job folded once
MOVED_SQL = "SELECT count(DISTINCT job_id) FROM bench_job_seen WHERE status = 'running' AND current_step = 'detect'"
SEEN_SQL = """
SELECT job_id, extract(epoch FROM min(at))::float8 FROM bench_job_seen
WHERE status = %s AND current_step = %s GROUP BY job_id
"""

# Closed-loop writers, as bench/run.py's writer_rate (the 1,000 jobs x 10 variants of its BACKLOG_SQL).
WRITERS_SQL = """
INSERT INTO jobs (job_id, status) SELECT gen_random_uuid(), 'queued' FROM generate_series(1, 1000);
INSERT INTO jobs_variants (job_variants_id, job_id, status)
    SELECT gen_random_uuid(), job_id, 'queued' FROM jobs, generate_series(1, 10);
"""
UPDATE_SQL = "UPDATE jobs_variants SET status = %s, current_step = %s WHERE job_variants_id = %s"


def _run_module() -> ModuleType:
    """bench/run.py, imported when first needed (so that run.py may import this module)."""
    try:
        return importlib.import_module("run")
    except ModuleNotFoundError:
        return importlib.import_module("bench.run")


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """Poll another process's progress (the worker's), never to order a race."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)
    return value


class WorkerProcess:
    """`outbox run` on ``db`` with the given wake-up, as a subprocess (as in production)."""

    def __init__(self, db: DatabaseUrl, wakeup: str) -> None:
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")},
            "OUTBOX_DATABASE_URL": db.url.render_as_string(hide_password=False),
            "OUTBOX_PIPELINE_STEPS": ",".join(STEPS),
            "OUTBOX_WAKEUP": wakeup,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "processor.cli", "run", "--log-level", "WARNING"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.output = ""

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"`outbox run` exited with {self.process.returncode}:\n{self._read()[-2000:]}")

    def wait_jobs(self, conn: psycopg.Connection[Any], query: str, count: int, timeout: float = 120) -> None:
        """Until ``query`` counts ``count`` jobs: what the bench measures, not the worker's own accounting."""

        def done() -> bool:
            self.check()
            row = conn.execute(query).fetchone()
            return row is not None and row[0] >= count

        wait_until(done, timeout=timeout, what=f"the worker to fold {count:,} jobs")

    def stop(self) -> None:
        """SIGTERM (finish the batch in hand, exit 0); keeps its output in ``output``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.output = self._read()
        self._log.close()

    def _read(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class LoadRun:
    offered: float  # updates/s asked for
    achieved: float  # updates committed / (last commit - schedule start)
    measured: int  # updates measured (after the warm-up)
    min_ms: float  # below 0 only if a writer thread took its timestamp late (after the worker's write)
    p50_ms: float
    p99_ms: float
    max_ms: float
    lag_p99_ms: float  # how late the scheduler issued updates (all writer connections busy)
    wakes: str  # the worker's own count of why its waits ended (notify only)


def open_loop(
    db: DatabaseUrl, variants: Sequence[uuid.UUID], *, rate: float, writers: int
) -> tuple[float, list[float], list[float]]:
    """Issue ``MOVE_SQL`` for each variant, the i-th at start + i / rate, from ``writers`` connections.

    A connection that is free takes the next update due, and sleeps until it is due; none waits
    for another update to finish. Returns the start of the schedule and, per update, the time at
    which its commit returned (both time.time()) and how late (s) it was issued.
    """
    committed = [0.0] * len(variants)
    late = [0.0] * len(variants)
    slots = itertools.count()  # next() is atomic under the GIL
    errors: list[BaseException] = []
    ready = threading.Barrier(writers + 1, timeout=60)
    start = 0.0
    pace = threading.Event()  # never set: waiting on it paces the schedule

    def write() -> None:
        try:
            with connect(db, application_name="outbox-bench-writer", autocommit=True) as conn:
                conn.execute("SELECT 1")
                ready.wait()  # connected; start is set once every writer is
                ready.wait()
                while (i := next(slots)) < len(variants) and not errors:
                    due = start + i / rate
                    pace.wait(max(0.0, due - time.monotonic()))
                    late[i] = time.monotonic() - due
                    conn.execute(MOVE_SQL, [variants[i]], prepare=True)
                    committed[i] = time.time()  # right after the commit returned (autocommit)
        except BaseException as exc:
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=write) for _ in range(writers)]
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


def latency_run(
    admin_url: DatabaseUrl, *, rate: float, mode: str, seconds: float, warmup: float, writers: int
) -> LoadRun:
    """One window of ``seconds`` at ``rate`` updates/s with the worker in ``mode``, after ``warmup`` s."""
    total = math.ceil(rate * (warmup + seconds))
    run = _run_module()
    with (
        run.scratch_database(admin_url, f"{DATABASE}_{run.RUN_TAG}") as db,
        connect(db, application_name="outbox-bench") as conn,
    ):
        conn.execute(JOBS_SQL.replace("%(jobs)s", str(total)).encode())
        store.wakeup_trigger_set(conn, enabled=mode == "notify")
        rows = conn.execute("SELECT job_variants_id, job_id FROM jobs_variants").fetchall()
        random.Random(SEED).shuffle(rows)  # updates land all over the table, as in production
        variants, jobs = [row[0] for row in rows], [row[1] for row in rows]
        worker = WorkerProcess(db, mode)
        try:
            worker.wait_jobs(conn, FOLDED_SQL, total)
            conn.execute(OBSERVER_SQL.encode())
            conn.execute("VACUUM ANALYZE")
            start, committed, late = open_loop(db, variants, rate=rate, writers=writers)
            worker.wait_jobs(conn, MOVED_SQL, total)
        finally:
            worker.stop()
        if worker.process.returncode != 0:
            raise RuntimeError(f"`outbox run` exited with {worker.process.returncode}:\n{worker.output[-2000:]}")
        seen = dict(conn.execute(SEEN_SQL, MOVED).fetchall())
    missing = [job for job in jobs if job not in seen]
    if missing:
        raise RuntimeError(f"{len(missing)} jobs never showed {MOVED}")
    first = math.ceil(rate * warmup)  # the updates due after the warm-up
    latencies = sorted(seen[jobs[i]] - committed[i] for i in range(first, total))
    lags = sorted(late[first:])
    woke = re.search(r"woke up .*", worker.output)
    return LoadRun(
        offered=rate,
        achieved=total / (max(committed) - start),
        measured=len(latencies),
        min_ms=latencies[0] * 1000,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        max_ms=latencies[-1] * 1000,
        lag_p99_ms=percentile(lags, 99) * 1000,
        wakes=woke.group(0) if woke else "",
    )


def writer_rate(db: DatabaseUrl, variants: Sequence[uuid.UUID], *, seconds: float, writers: int, seed: int) -> float:
    """Single-variant update transactions per second from ``writers`` autocommit connections (closed loop)."""
    counts = [0] * writers
    errors: list[BaseException] = []
    ready = threading.Barrier(writers + 1, timeout=60)
    stop = threading.Event()

    def write(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        try:
            with connect(db, application_name="outbox-bench-writer", autocommit=True) as conn:
                ready.wait()  # connected: the window starts when every writer is
                while not stop.is_set():
                    conn.execute(UPDATE_SQL, [rng.choice(("running", "done")), rng.choice(STEPS), rng.choice(variants)])
                    counts[index] += 1
        except BaseException as exc:
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    ready.wait()
    began = time.perf_counter()
    stop.wait(seconds)  # the measurement window, not synchronisation
    stop.set()
    elapsed = time.perf_counter() - began
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def notify_cost_run(admin_url: DatabaseUrl, *, run: int, seconds: float, writers: int) -> dict[str, float]:
    """Writer tx/s with the capture triggers and the notify trigger disabled, then enabled (order alternates)."""
    run_module = _run_module()
    rates: dict[str, float] = {}
    with (
        run_module.scratch_database(admin_url, f"{DATABASE}_writers_{run_module.RUN_TAG}") as db,
        connect(db, application_name="outbox-bench") as conn,
    ):
        conn.execute(WRITERS_SQL.encode())
        conn.execute("VACUUM ANALYZE")
        variants = [row[0] for row in conn.execute("SELECT job_variants_id FROM jobs_variants")]
        for enabled in (False, True) if run % 2 == 0 else (True, False):
            store.wakeup_trigger_set(conn, enabled=enabled)
            rates["on" if enabled else "off"] = writer_rate(
                db, variants, seconds=seconds, writers=writers, seed=SEED * 100 + run
            )
    return rates


def measure(
    admin_url: DatabaseUrl,
    *,
    runs: int,
    seconds: float,
    loads: Sequence[float] = (500, 2000),
    writers: int = 8,
    warmup: float = 1.0,
    throughput_writers: int = 4,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Latency per load and wake-up, and writer throughput with NOTIFY off and on: medians over ``runs``, flat keys."""
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # a writer thread back from its commit takes its timestamp sooner
    try:
        return _measure(
            admin_url,
            runs=runs,
            seconds=seconds,
            loads=loads,
            writers=writers,
            warmup=warmup,
            throughput_writers=throughput_writers,
            log=log,
        )
    finally:
        sys.setswitchinterval(switch_interval)


def _measure(
    admin_url: DatabaseUrl,
    *,
    runs: int,
    seconds: float,
    loads: Sequence[float],
    writers: int,
    warmup: float,
    throughput_writers: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    by_case: dict[tuple[float, str], list[LoadRun]] = {(load, mode): [] for load in loads for mode in MODES}
    writer_runs: list[dict[str, float]] = []
    for run in range(runs):
        for load in loads:
            for mode in MODES if run % 2 == 0 else MODES[::-1]:  # alternate, against drift
                result = latency_run(admin_url, rate=load, mode=mode, seconds=seconds, warmup=warmup, writers=writers)
                by_case[(load, mode)].append(result)
                log(
                    f"run {run + 1}, {load:g}/s, {mode}: achieved {result.achieved:,.0f}/s, "
                    f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, max {result.max_ms:.1f} ms "
                    f"(min {result.min_ms:.1f} ms, {result.measured:,} updates; "
                    f"scheduler lag p99 {result.lag_p99_ms:.1f} ms) {result.wakes}"
                )
        rates = notify_cost_run(admin_url, run=run, seconds=seconds, writers=throughput_writers)
        writer_runs.append(rates)
        log(f"run {run + 1}, writers: notify off {rates['off']:,.0f} tx/s, on {rates['on']:,.0f} tx/s")
    figures: dict[str, Any] = {}
    for (load, mode), results in by_case.items():
        suffix = f"{load:g}_per_s_{mode}"
        figures[f"latency_p50_ms_{suffix}"] = round(statistics.median(r.p50_ms for r in results), 1)
        figures[f"latency_p99_ms_{suffix}"] = round(statistics.median(r.p99_ms for r in results), 1)
        figures[f"latency_max_ms_{suffix}"] = round(statistics.median(r.max_ms for r in results), 1)
        figures[f"latency_achieved_per_s_{suffix}"] = round(statistics.median(r.achieved for r in results))
        figures[f"latency_scheduler_lag_p99_ms_{suffix}"] = round(statistics.median(r.lag_p99_ms for r in results), 1)
    off = statistics.median(r["off"] for r in writer_runs)
    on = statistics.median(r["on"] for r in writer_runs)
    figures["writer_tx_per_second_notify_off"] = round(off)
    figures["writer_tx_per_second_notify_on"] = round(on)
    figures["writer_ratio_notify_on_off"] = round(on / off, 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", default="500,2000", help="offered loads, variant updates per second")
    parser.add_argument("--seconds", type=float, default=20, help="measurement window per figure and run")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (the median is reported)")
    parser.add_argument("--writers", type=int, default=8, help="writer connections of the open loop")
    parser.add_argument(
        "--throughput-writers", type=int, default=4, help="writer connections of the closed loop (as bench/run.py)"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before the window")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    loads = [float(load) for load in args.loads.split(",")]
    console = Console(stderr=args.json, soft_wrap=True)
    admin_url = _run_module().server()
    figures = measure(
        admin_url,
        runs=args.runs,
        seconds=args.seconds,
        loads=loads,
        writers=args.writers,
        warmup=args.warmup,
        throughput_writers=args.throughput_writers,
        log=console.print,
    )
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    title = f"latency, commit to job state (median of {args.runs} runs of {args.seconds:g} s, {args.writers} writers)"
    table = Table("offered/s", "wake-up", "achieved/s", "p50 ms", "p99 ms", "max ms", "sched. lag p99 ms", title=title)
    for load in loads:
        for mode in MODES:
            suffix = f"{load:g}_per_s_{mode}"
            table.add_row(
                f"{load:g}",
                mode,
                f"{figures[f'latency_achieved_per_s_{suffix}']:,}",
                f"{figures[f'latency_p50_ms_{suffix}']}",
                f"{figures[f'latency_p99_ms_{suffix}']}",
                f"{figures[f'latency_max_ms_{suffix}']}",
                f"{figures[f'latency_scheduler_lag_p99_ms_{suffix}']}",
            )
    console.print(table)
    writers = Table(
        "notify trigger", "writer tx/s", title=f"writer throughput (closed loop, {args.throughput_writers} writers)"
    )
    writers.add_row("disabled", f"{figures['writer_tx_per_second_notify_off']:,}")
    writers.add_row("enabled", f"{figures['writer_tx_per_second_notify_on']:,}")
    writers.add_row("ratio", f"{figures['writer_ratio_notify_on_off']}")
    console.print(writers)


if __name__ == "__main__":
    main()
