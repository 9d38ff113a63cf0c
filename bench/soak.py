"""A soak (issue 18): writers at a fixed rate for ten minutes while `outbox run` applies and retention removes.

    python bench/soak.py [--minutes 10] [--rate 1000] [--writers 4] [--retention 1m] [--every 5]
    python bench/soak.py --quick        # 0.5 minute, 200/s, retention 5s, a sample every 2 s: a smoke run

What it shows: whether the outbox stays bounded on disk when events come in steadily and retention
removes them by whole segments (decision 0015), what that costs (dead tuples: none expected; the
baseline's size: at most one row per variant) and whether the worker keeps up meanwhile (pending
events and the age of the oldest).

Setup: a scratch database on the server of OUTBOX_BENCH_DATABASE_URL (or OUTBOX_TEST_DATABASE_URL),
else the embedded server, migrated by this tree (bench/run.py's `fresh_database`); --jobs jobs of
--variants variants written through the capture trigger; `python -m processor.cli run` as a
subprocess (OUTBOX_PIPELINE_STEPS as bench/run.py, OUTBOX_RETENTION=--retention: the worker, the
only one and so the elected one, runs a round every eighth of the period, between 1 s and 10
minutes); the soak starts once the worker has applied the setup's events.

For --minutes: --writers threads, each on its own autocommit connection and its own share of the
variants, update one variant per transaction, always to a state it did not have (so every
transaction appends an event), at --rate transactions/s in all. Open loop, by absolute deadlines:
thread k takes slots k, k + W, k + 2W, ... of one schedule at the rate (slot i due at start + i /
rate), and sleeps until its next slot; a transaction that goes out late does not push the later
ones back, so the rate holds as long as the server keeps up. A transaction issued more than one of
its thread's periods (W / rate) after its slot was due *missed* it (counted; it still goes out).

Every --every seconds a sampler on its own connection records (CSV, one row a sample): the
outbox's size (heap, indexes and TOAST of every leaf of pg_partition_tree('outbox_events')), its
rows (n_live_tup summed: the statistics' estimate), its segments and how many are free
(outbox_segments, opened_at IS NULL; the same for the transitions), outbox_variant_baseline's and
outbox_job_transitions' sizes, dead tuples in the outbox's and the transitions' partitions
(n_dead_tup, after pg_stat_clear_snapshot()), pending events and the age of the oldest
(outbox_events_pending(NULL); 0 when none), the writers' rate over the interval, the missed slots so
far, the events the worker's log says retention removed so far, and the load average. After the
writers stop, how long the worker takes to apply what is left; then it is stopped (SIGTERM) and its
exit code recorded. Its output (INFO: "retention removed ...", "writers now append to segment ...")
is kept beside the CSV.

Outputs: bench/runs/<UTC time>-soak.csv, -soak.md (the machine, the exact command, the settings;
min / median / max of each series over the second half of the run; the outbox's size in the first
and the last minute; missed slots; what the worker's log says of retention; its exit code) and
-soak-worker.log; a plot to docs/images/soak.png (matplotlib, the `dev` extra: without it, no plot
and a note). --output and --plot choose other places; --quick writes to a temporary folder and
draws no plot unless --plot.

Noise. The server and the host are shared: another session's work slows the writers (missed
slots) and the worker (pending age); the load average is sampled for that. n_live_tup and
n_dead_tup are the statistics', flushed by each backend at most once a second, and TRUNCATE resets
them: estimates, not counts. A segment's size lags its rows (pages are allocated in advance, and an
index leaves pages it splits); the sizes move in steps of one segment as retention truncates. The
sampler's own reads take an ACCESS SHARE lock on each segment for a few milliseconds: a truncation
asking for its lock then waits (at most 500 ms: a round may keep a segment for the next because of
the sampler, as it would for any reader). Benchmarks print figures; tests never assert timings.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # run.py and latency.py, when started as `python bench/soak.py`
    sys.path.insert(0, str(HERE))

import psycopg  # noqa: E402
import run as run_module  # noqa: E402
from latency import wait_until  # noqa: E402
from rich.console import Console  # noqa: E402

from processor.database import DatabaseUrl, connect  # noqa: E402
from processor.retention import parse_duration, retention_every  # noqa: E402

APPLICATION = "outbox-bench-soak"
DATABASE = f"outbox_bench_soak_{os.getpid()}"  # two runs on one server never drop each other's
SEED = 18
MB = 1e6

# Jobs and variants through the capture trigger, as production writes them (one event per variant).
JOBS_SQL = """
INSERT INTO jobs (job_id, status) SELECT gen_random_uuid(), 'queued' FROM generate_series(1, {jobs});
INSERT INTO jobs_variants (job_variants_id, job_id, status)
    SELECT gen_random_uuid(), job_id, 'queued' FROM jobs, generate_series(1, {variants});
"""
# Sizes, live and dead tuples of every leaf holding the outbox's rows, the transitions' and the
# baseline's (a plain table: pg_partition_tree lists no leaf for it). Statistics: pg_stat_clear_snapshot
# first, so that no snapshot of them taken earlier is read again.
TABLES_SQL = """
WITH leaves (what, relid) AS (
    SELECT 'outbox', relid FROM pg_partition_tree('outbox_events') WHERE isleaf
    UNION ALL
    SELECT 'transitions', relid FROM pg_partition_tree('outbox_job_transitions') WHERE isleaf
    UNION ALL
    SELECT 'baseline', 'outbox_variant_baseline'::regclass
)
SELECT l.what, coalesce(sum(pg_total_relation_size(l.relid)), 0)::bigint,
       coalesce(sum(s.n_live_tup), 0)::bigint, coalesce(sum(s.n_dead_tup), 0)::bigint
FROM leaves AS l LEFT JOIN pg_stat_user_tables AS s ON s.relid = l.relid
GROUP BY l.what
"""
SEGMENTS_SQL = """
SELECT count(*) FILTER (WHERE relation = 'outbox_events'),
       count(*) FILTER (WHERE relation = 'outbox_events' AND opened_at IS NULL),
       count(*) FILTER (WHERE relation = 'outbox_job_transitions'),
       count(*) FILTER (WHERE relation = 'outbox_job_transitions' AND opened_at IS NULL)
FROM outbox_segments
"""
# The product's own rule of what is pending (as `outbox backlog`).
PENDING_SQL = """
SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8
FROM outbox_events_pending(NULL)
"""
# What the worker logs at INFO (processor/retention.py).
REMOVED = re.compile(r"retention removed (\d+) events and (\d+) transitions")
ROTATED = re.compile(r"writers now append to segment")
LOCK_WAIT = re.compile(r"the next segment waits for a lock")
FAILED = re.compile(r"retention round failed")


@dataclass(frozen=True)
class Plan:
    minutes: float
    rate: float  # transactions/s, all writers together
    writers: int
    retention: str  # OUTBOX_RETENTION
    every: float  # seconds between samples
    jobs: int
    variants: int  # per job

    @property
    def seconds(self) -> float:
        return self.minutes * 60


@dataclass(frozen=True)
class Sample:
    """One row of the CSV (sizes in bytes; counts; seconds)."""

    elapsed_s: float
    outbox_bytes: int
    outbox_rows: int
    segments: int
    segments_free: int
    transition_segments: int
    transition_segments_free: int
    baseline_bytes: int
    transitions_bytes: int
    dead_tuples_outbox: int
    dead_tuples_transitions: int
    pending_events: int
    oldest_pending_s: float
    writer_tx_per_s: float
    missed_slots: int  # so far
    removed_events: int  # so far, from the worker's log
    load_1m: float


# The worker


class Worker:
    """`outbox run` on ``db`` with OUTBOX_RETENTION, as a subprocess; its output in ``log_path``."""

    def __init__(self, db: DatabaseUrl, plan: Plan, log_path: Path) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")},
            "OUTBOX_DATABASE_URL": db.url.render_as_string(hide_password=False),
            "OUTBOX_PIPELINE_STEPS": run_module.STEPS,
            "OUTBOX_RETENTION": plan.retention,
        }
        self.process = subprocess.Popen(
            # INFO: retention logs each round that removed something and each rotation.
            [sys.executable, "-m", "processor.cli", "run", "--log-level", "INFO"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        """SIGTERM (it finishes the batch in hand and exits 0); its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_worker(db: DatabaseUrl, plan: Plan, log_path: Path) -> Iterator[Worker]:
    """The worker, stopped on the way out (before the scratch database is dropped), failed or not."""
    worker = Worker(db, plan, log_path)
    try:
        yield worker
    finally:
        worker.stop()


def retention_log(text: str) -> dict[str, int]:
    """What the worker's log says retention did."""
    removed = [(int(m.group(1)), int(m.group(2))) for m in REMOVED.finditer(text)]
    return {
        "rounds_removing": len(removed),
        "events_removed": sum(events for events, _ in removed),
        "transitions_removed": sum(transitions for _, transitions in removed),
        "rotations": len(ROTATED.findall(text)),
        "lock_waits": len(LOCK_WAIT.findall(text)),
        "failed_rounds": len(FAILED.findall(text)),
    }


# The writers


class Writers:
    """``plan.writers`` threads at ``plan.rate`` transactions/s in all, open loop by absolute deadlines.

    Each has its own autocommit connection and its own share of the variants, and moves a variant
    to a state it did not have (bench/run.py's writer statement), so that every transaction appends
    an event.
    """

    def __init__(self, db: DatabaseUrl, variants: Sequence[Any], plan: Plan) -> None:
        self.db = db
        self.plan = plan
        self.shares = [list(variants[i :: plan.writers]) for i in range(plan.writers)]
        self.counts = [0] * plan.writers  # each thread writes only its own entry
        self.missed = [0] * plan.writers
        self.worst_late = [0.0] * plan.writers
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self.start = 0.0
        self._ready = threading.Barrier(plan.writers + 1, timeout=60)
        self._threads = [threading.Thread(target=self._write, args=(i,), daemon=True) for i in range(plan.writers)]

    def begin(self) -> float:
        """Start writing once every thread has connected; the schedule's start (time.monotonic())."""
        for thread in self._threads:
            thread.start()
        try:
            self._ready.wait()  # every writer connected
            self.start = time.monotonic() + 0.05
            self._ready.wait()
        except threading.BrokenBarrierError:
            self.stop()
            raise self.errors[0] if self.errors else RuntimeError("a writer failed to connect") from None
        return self.start

    def stop(self) -> None:
        self.stopping.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)

    def committed(self) -> int:
        return sum(self.counts)

    def missed_slots(self) -> int:
        return sum(self.missed)

    def _write(self, index: int) -> None:
        rng = random.Random(SEED * 100 + index)
        share = self.shares[index]
        steps = run_module.STEPS.split(",")
        last: dict[Any, tuple[str, str | None]] = {variant: ("queued", None) for variant in share}
        period = self.plan.writers / self.plan.rate  # between two slots of this thread
        try:
            with connect(self.db, application_name=f"{APPLICATION}-writer-{index}", autocommit=True) as conn:
                conn.execute("SELECT 1")
                self._ready.wait()  # connected; the start is set once every writer is
                self._ready.wait()
                slot = 0
                while not self.stopping.is_set():
                    # Absolute deadlines: a late transaction does not move the later slots.
                    due = self.start + (index + slot * self.plan.writers) / self.plan.rate
                    wait = due - time.monotonic()
                    if wait > 0:
                        if self.stopping.wait(wait):  # paces the schedule; ends early on stop
                            break
                    else:
                        self.worst_late[index] = max(self.worst_late[index], -wait)
                        if -wait > period:
                            self.missed[index] += 1
                    variant = rng.choice(share)
                    while (change := (rng.choice(("running", "done")), rng.choice(steps))) == last[variant]:
                        pass
                    last[variant] = change
                    conn.execute(run_module.UPDATE_SQL, [change[0], change[1], variant], prepare=True)
                    self.counts[index] += 1
                    slot += 1
        except BaseException as exc:
            self.errors.append(exc)
            self._ready.abort()


# The sampler


def scalar_row(conn: psycopg.Connection[Any], query: str) -> tuple[Any, ...]:
    row = conn.execute(query.encode()).fetchone()
    assert row is not None
    return tuple(row)


def pending(conn: psycopg.Connection[Any]) -> tuple[int, float]:
    count, age = scalar_row(conn, PENDING_SQL)
    return int(count), float(age)


def sample(
    conn: psycopg.Connection[Any], elapsed: float, writer_rate: float, writers: Writers, worker: Worker
) -> Sample:
    """One row: each read is its own short autocommit transaction (the locks it takes go at once)."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    tables = {row[0]: row[1:] for row in conn.execute(TABLES_SQL.encode())}
    segments, free, transition_segments, transition_free = scalar_row(conn, SEGMENTS_SQL)
    count, age = pending(conn)
    return Sample(
        elapsed_s=round(elapsed, 2),
        outbox_bytes=int(tables["outbox"][0]),
        outbox_rows=int(tables["outbox"][1]),
        segments=int(segments),
        segments_free=int(free),
        transition_segments=int(transition_segments),
        transition_segments_free=int(transition_free),
        baseline_bytes=int(tables["baseline"][0]),
        transitions_bytes=int(tables["transitions"][0]),
        dead_tuples_outbox=int(tables["outbox"][2]),
        dead_tuples_transitions=int(tables["transitions"][2]),
        pending_events=count,
        oldest_pending_s=round(age, 3),
        writer_tx_per_s=round(writer_rate, 1),
        missed_slots=writers.missed_slots(),
        removed_events=retention_log(worker.output())["events_removed"],
        load_1m=round(os.getloadavg()[0], 2),
    )


def create_jobs(db: DatabaseUrl, plan: Plan) -> list[Any]:
    """The jobs and variants, through capture; the variants' ids, shuffled (writes land all over the table)."""
    with connect(db, application_name=APPLICATION) as conn:  # autocommit
        conn.execute(JOBS_SQL.format(jobs=plan.jobs, variants=plan.variants).encode())
        conn.execute("VACUUM ANALYZE")
        variants = [row[0] for row in conn.execute("SELECT job_variants_id FROM jobs_variants ORDER BY 1")]
    random.Random(SEED).shuffle(variants)
    return variants


def soak(
    db: DatabaseUrl, variants: Sequence[Any], plan: Plan, worker: Worker, say: Callable[[str], None]
) -> tuple[list[Sample], Writers, float | None]:
    """The writers for ``plan.minutes``, a sample every ``plan.every`` s; the samples, the writers, and how
    long the worker took to apply what was left once they stopped (None: not within a minute)."""
    samples: list[Sample] = []
    writers = Writers(db, variants, plan)
    with connect(db, application_name=f"{APPLICATION}-sampler", autocommit=True) as conn:
        start = writers.begin()
        try:
            before = (start, 0)
            for k in range(int(plan.seconds / plan.every + 1e-9) + 1):
                # Absolute deadlines again, so that slow samples do not stretch the run.
                time.sleep(max(0.0, start + k * plan.every - time.monotonic()))
                now, committed = time.monotonic(), writers.committed()
                rate = (committed - before[1]) / (now - before[0]) if now > before[0] else 0.0
                before = (now, committed)
                row = sample(conn, now - start, rate, writers, worker)
                samples.append(row)
                say_sample(row, say)
                if writers.errors or not worker.alive():
                    break
        finally:
            writers.stop()
        if writers.errors:
            raise writers.errors[0]
        if not worker.alive():
            return samples, writers, None
        stopped = time.monotonic()
        try:
            wait_until(lambda: worker.alive() and pending(conn)[0] == 0, timeout=60, what="the worker to catch up")
        except RuntimeError:
            return samples, writers, None
        return samples, writers, time.monotonic() - stopped


def say_sample(row: Sample, say: Callable[[str], None]) -> None:
    say(
        f"{row.elapsed_s:6.1f} s: outbox {row.outbox_bytes / MB:6.1f} MB, ~{row.outbox_rows:,} rows, "
        f"segments {row.segments} ({row.segments_free} free); baseline {row.baseline_bytes / MB:.1f} MB; "
        f"transitions {row.transitions_bytes / MB:.1f} MB; dead tuples {row.dead_tuples_outbox:,} / "
        f"{row.dead_tuples_transitions:,}; pending {row.pending_events:,} (oldest {row.oldest_pending_s:.2f} s); "
        f"writers {row.writer_tx_per_s:,.0f} tx/s, {row.missed_slots:,} missed; removed {row.removed_events:,}; "
        f"load {row.load_1m}"
    )


# Summary


# The series of the summary: label, and the value from a sample.
SERIES: list[tuple[str, Callable[[Sample], float]]] = [
    ("outbox MB", lambda s: s.outbox_bytes / MB),
    ("outbox rows (estimate)", lambda s: s.outbox_rows),
    ("segments (events)", lambda s: s.segments),
    ("free segments (events)", lambda s: s.segments_free),
    ("segments (transitions)", lambda s: s.transition_segments),
    ("baseline MB", lambda s: s.baseline_bytes / MB),
    ("transitions MB", lambda s: s.transitions_bytes / MB),
    ("dead tuples, outbox", lambda s: s.dead_tuples_outbox),
    ("dead tuples, transitions", lambda s: s.dead_tuples_transitions),
    ("pending events", lambda s: s.pending_events),
    ("oldest pending, s", lambda s: s.oldest_pending_s),
    ("writers, tx/s (interval)", lambda s: s.writer_tx_per_s),
    ("load average, 1 min", lambda s: s.load_1m),
]


def number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 or float(value).is_integer() else f"{value:,.2f}"


def summary_rows(samples: Sequence[Sample], since: float) -> list[list[str]]:
    """Min, median and max of each series over the samples from ``since`` seconds."""
    late = [s for s in samples if s.elapsed_s >= since] or list(samples)
    rows = []
    for label, value in SERIES:
        values = [float(value(s)) for s in late]
        rows.append([label, number(min(values)), number(statistics.median(values)), number(max(values))])
    return rows


def bounded_lines(samples: Sequence[Sample], seconds: float) -> list[str]:
    """The outbox's size in the first and the last minute (a quarter of the run if shorter), and its
    trend over the second half (least squares): what says whether it stayed bounded."""
    window = min(60.0, seconds / 4)
    end = samples[-1].elapsed_s
    first = [s.outbox_bytes / MB for s in samples if s.elapsed_s <= window]
    last = [s.outbox_bytes / MB for s in samples if s.elapsed_s >= end - window]
    lines = [
        f"outbox MB, first {window:g} s: median {statistics.median(first):.1f}, max {max(first):.1f}; "
        f"last {window:g} s: median {statistics.median(last):.1f}, max {max(last):.1f}"
    ]
    half = [s for s in samples if s.elapsed_s >= seconds / 2]
    if len(half) >= 3:
        slope, _ = statistics.linear_regression([s.elapsed_s for s in half], [s.outbox_bytes / MB for s in half])
        lines.append(f"outbox MB trend over the second half: {slope * 60:+.2f} MB/min (least squares)")
    return lines


def markdown(lines: Sequence[str], caption: str, rows: Sequence[Sequence[str]], notes: Sequence[str]) -> str:
    """The printed lines verbatim, then the table and the notes (as bench/retention.py writes its copy)."""
    out = ["# Soak: writers at a fixed rate with retention running (bench/soak.py)", "", "```text", *lines, "```", ""]
    out += [f"## {caption}", "", "| series | min | median | max |", "| --- | --- | --- | --- |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    out += ["", *[f"- {note}" for note in notes]]
    return "\n".join(out) + "\n"


def write_csv(path: Path, samples: Sequence[Sample]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[f.name for f in dataclasses.fields(Sample)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(s) for s in samples)


def read_csv(path: Path) -> list[Sample]:
    """The samples of an earlier run (write_csv's file), to draw its plot again (--replot)."""
    kinds = {f.name: f.type for f in dataclasses.fields(Sample)}
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows or set(rows[0]) != set(kinds):
        raise SystemExit(f"{path}: not a soak CSV (expected the columns {', '.join(kinds)})")
    return [Sample(**{k: (float(v) if kinds[k] == "float" else int(v)) for k, v in row.items()}) for row in rows]


def plot(path: Path, samples: Sequence[Sample], title: str) -> str:
    """Four panels on one time axis; what was done (a missing matplotlib is a note, not a failure)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: a file only
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib, or the project's dev extra)"
    t = [s.elapsed_s for s in samples]
    fig, (sizes, dead, lag, writers) = plt.subplots(
        4, 1, sharex=True, figsize=(10, 11), gridspec_kw={"height_ratios": [3, 2, 3, 2]}
    )
    sizes.plot(t, [s.outbox_bytes / MB for s in samples], label="outbox MB")
    sizes.plot(t, [s.baseline_bytes / MB for s in samples], label="baseline MB")
    sizes.set_ylabel("MB")
    sizes.set_ylim(bottom=0)
    count = sizes.twinx()
    count.step(t, [s.segments for s in samples], where="post", color="tab:gray", linestyle="--", label="segments")
    count.set_ylabel("segments (events)")
    count.set_ylim(bottom=0)
    handles, labels = sizes.get_legend_handles_labels()
    more, more_labels = count.get_legend_handles_labels()
    sizes.legend(handles + more, labels + more_labels, loc="upper left")
    dead.plot(t, [s.dead_tuples_outbox for s in samples], label="outbox")
    dead.plot(t, [s.dead_tuples_transitions for s in samples], label="transitions")
    dead.set_ylabel("dead tuples")
    most = max([s.dead_tuples_outbox for s in samples] + [s.dead_tuples_transitions for s in samples] + [0])
    dead.set_ylim(0, max(10, most * 1.1))  # all zero (what segments promise) shows as a line on the floor
    dead.legend(loc="upper left")
    lag.plot(t, [s.pending_events for s in samples], label="pending events")
    lag.set_ylabel("pending events")
    lag.set_ylim(bottom=0)
    age = lag.twinx()
    age.plot(t, [s.oldest_pending_s for s in samples], color="tab:red", label="oldest pending (s)")
    age.set_ylabel("oldest pending, s")
    age.set_ylim(bottom=0)
    handles, labels = lag.get_legend_handles_labels()
    more, more_labels = age.get_legend_handles_labels()
    lag.legend(handles + more, labels + more_labels, loc="upper left")
    # The writers' rate over each interval: a host that cannot keep the schedule shows here (and the
    # outbox then holds more events per minute of retention while the writers catch up).
    writers.plot(t, [s.writer_tx_per_s for s in samples], color="tab:green", label="writers, tx/s")
    writers.set_ylabel("writers, tx/s")
    writers.set_ylim(bottom=0)
    writers.legend(loc="upper left")
    writers.set_xlabel("elapsed, s")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot written to {path}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=None, help="length of the soak (10; 0.5 with --quick)")
    parser.add_argument("--rate", type=float, default=None, help="transactions/s, all writers (1,000; 200 quick)")
    parser.add_argument("--writers", type=int, default=4, help="writer threads, each on its own connection")
    parser.add_argument("--retention", default=None, help="OUTBOX_RETENTION of the worker (1m; 5s with --quick)")
    parser.add_argument("--every", type=float, default=None, help="seconds between samples (5; 2 with --quick)")
    parser.add_argument("--jobs", type=int, default=2000, help="jobs the writers update")
    parser.add_argument("--variants", type=int, default=5, help="variants per job")
    parser.add_argument("--quick", action="store_true", help="0.5 minute, 200/s, retention 5s: a smoke run")
    parser.add_argument("--output", type=Path, default=None, help="folder of the CSV, markdown and log (bench/runs)")
    parser.add_argument("--plot", type=Path, default=None, help="the PNG (docs/images/soak.png; none with --quick)")
    parser.add_argument("--replot", type=Path, default=None, help="draw the plot of an earlier run's CSV, and exit")
    parser.add_argument("--title", default=None, help="the plot's title with --replot (default: the CSV's name)")
    args = parser.parse_args(argv)
    if args.replot is not None:
        samples = read_csv(args.replot)
        target = args.plot or ROOT / "docs" / "images" / "soak.png"
        print(plot(target, samples, args.title or f"soak: {args.replot.name}"))
        return 0
    quick = args.quick
    plan = Plan(
        minutes=args.minutes if args.minutes is not None else (0.5 if quick else 10.0),
        rate=args.rate if args.rate is not None else (200.0 if quick else 1000.0),
        writers=args.writers,
        retention=args.retention or ("5s" if quick else "1m"),
        every=args.every if args.every is not None else (2.0 if quick else 5.0),
        jobs=args.jobs,
        variants=args.variants,
    )
    round_every = retention_every(parse_duration(plan.retention))  # refuses a bad duration before anything starts
    output = args.output or (Path(tempfile.mkdtemp(prefix="outbox-soak-")) if quick else HERE / "runs")
    picture = args.plot or (None if quick else ROOT / "docs" / "images" / "soak.png")

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log file: no wrapping
    lines: list[str] = []

    def say(line: str, keep: bool = True) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
        if keep:
            lines.append(line)

    admin_url = run_module.server()
    machine = run_module.machine(admin_url)
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y-%m-%dT%H%M")
    output.mkdir(parents=True, exist_ok=True)
    command = shlex.join(
        [sys.executable, sys.argv[0] if argv is None else "bench/soak.py", *(sys.argv[1:] if argv is None else argv)]
    )
    machine_line = (
        f"{machine['cores']} cores, PostgreSQL {machine['postgresql']}, Python {machine['python']}, "
        f"psycopg {machine['psycopg']} ({machine['platform']}; "
        f"load average at start {machine['load_average_at_start']})"
    )
    say(f"machine: {machine_line}")
    say(f"command: {command}")
    say(f"started {started.isoformat(timespec='seconds')}")
    say(
        f"{plan.minutes:g} minutes at {plan.rate:,.0f} tx/s (one variant update each) from {plan.writers} writers, "
        f"open loop; {plan.jobs:,} jobs of {plan.variants} variants; one `outbox run`, OUTBOX_RETENTION="
        f"{plan.retention} (a round every {round_every:g} s); a sample every {plan.every:g} s"
    )
    log_path = output / f"{stamp}-soak-worker.log"
    with run_module.scratch_database(admin_url, DATABASE) as db:
        variants = create_jobs(db, plan)
        with running_worker(db, plan, log_path) as worker:
            with connect(db, application_name=APPLICATION, autocommit=True) as conn:
                # Start on a caught-up worker: the setup's events applied.
                wait_until(lambda: worker.alive() and pending(conn)[0] == 0, timeout=120, what="the setup's events")
            samples, writers, caught_up = soak(db, variants, plan, worker, lambda line: say(line, keep=False))
        exit_code = worker.process.returncode
    retained = retention_log(worker.output())

    csv_path = output / f"{stamp}-soak.csv"
    write_csv(csv_path, samples)
    total = writers.committed()
    elapsed = samples[-1].elapsed_s if samples else 0.0
    notes = [
        f"writers: {total:,} transactions in {elapsed:.0f} s ({total / elapsed if elapsed else 0:,.0f} tx/s); "
        f"missed slots (issued over {plan.writers / plan.rate * 1000:g} ms late): {writers.missed_slots():,}, "
        f"the latest transaction issued {max(writers.worst_late) * 1000:,.1f} ms after its slot",
        *bounded_lines(samples, plan.seconds),
        f"retention, from the worker's log: {retained['rounds_removing']} rounds removed events "
        f"({retained['events_removed']:,} events, {retained['transitions_removed']:,} transitions); "
        f"{retained['rotations']} rotations; {retained['lock_waits']} rotations left for a lock; "
        f"{retained['failed_rounds']} rounds failed",
        "the worker applied what was left "
        + (f"{caught_up:.1f} s after the writers stopped" if caught_up is not None else "NOT within 60 s"),
        f"worker exit code: {exit_code}",
        f"samples: {csv_path.name}; the worker's output: {log_path.name}",
    ]
    took = (dt.datetime.now(dt.UTC) - started).total_seconds()
    say(f"load average at the end {[round(load, 2) for load in os.getloadavg()]}; took {took:.0f} s")
    for note in notes:
        say(note, keep=False)
    caption = f"Second half of the run (from {plan.seconds / 2:g} s): min / median / max of each series"
    rows = summary_rows(samples, plan.seconds / 2)
    md_path = output / f"{stamp}-soak.md"
    md_path.write_text(markdown(lines, caption, rows, notes))
    say(f"written {csv_path} and {md_path}", keep=False)
    if picture is not None:
        host = f"{machine['cores']} cores, PostgreSQL {machine['postgresql'].split()[0]}"
        title = f"soak: {plan.rate:,.0f} tx/s, OUTBOX_RETENTION={plan.retention}, {plan.minutes:g} min ({host})"
        say(plot(picture, samples, title), keep=False)
    return 0 if exit_code == 0 else 1  # a worker that died mid-run ended the soak early, and exits with an error


if __name__ == "__main__":
    sys.exit(main())
