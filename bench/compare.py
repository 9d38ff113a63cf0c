"""Writer throughput side by side: no trigger, the legacy trigger (as is and locked), capture, PgQ.

    python bench/compare.py [--rounds 3] [--seconds 10] [--writers 4] [--workloads single,two-jobs,wide]
                            [--configs no-trigger,legacy,legacy-locked,capture,capture-worker,pgq]
    python bench/compare.py --quick            # tiny sizes, 1 round of 1 s: a smoke run

What users compare this product against (issue 18), measured in one run. Each config is a scratch
database of its own on the server of OUTBOX_BENCH_DATABASE_URL (or OUTBOX_TEST_DATABASE_URL), else
the embedded server, holding the same jobs:

  no-trigger      the legacy tables (tests/sql/legacy_schema.sql) without their trigger: the base
  legacy          the legacy AFTER UPDATE trigger: counts the job's variants and updates the job
  legacy-locked   the same trigger, first locking the job row (SELECT ... FOR UPDATE): the first fix
                  people reach for, so that concurrent finishes of one job take turns
  capture         this product's capture (a database migrated with processor.migrate), no worker
  capture-worker  the same, with `outbox run` as a subprocess draining beside the writers
  pgq             PgQ's C trigger pgq.logutriga queueing every update (no ticker, no consumer);
                  skipped, with a note, when the server has no pgq extension (postgresql-15-pgq3)

Every database has an index on jobs_variants(job_id) (migrate creates one; the bench adds it to the
others), so the legacy triggers' count reads the job's variants only (bench/legacy.py measures the
schema as given, without it).

Workloads (--workloads): --writers threads, each on its own connection and with its own variants,
so that writers never wait for each other's variant rows: every lock wait and deadlock is a trigger's.

  single    one variant per transaction, a random status/step change; 1,000 jobs of 10 variants
  two-jobs  one variant in each of two random jobs per transaction, in random order (so lock orders
            differ between transactions), each finished (done at the last step), or reopened
            (running at the first step) when done, so that the run can go on; 32 jobs of one
            variant per writer. Deadlocks (40P01) and serialization failures (40001) are counted
            and the transaction retried until it commits.
  wide      one variant per transaction, finished or reopened as in two-jobs, of 4 jobs of 300
            variants: every writer on the same few job rows

Rounds are interleaved: in each round, each workload runs every config once for --seconds, in an
order rotating from round to round and workload to workload, so that the host's noise hits all
configs alike; a short warm-up per config and workload comes first. Per config and workload: tx/s
per round and the median, the ratio to no-trigger (the median of per-round ratios), deadlocks, and
the server CPU of the writers' backends per transaction (bench/run.py's backend_cpu_seconds; not the
worker's). At the end, what each config left behind after two-jobs: jobs whose status disagrees with
their variants (legacy triggers; capture-worker once drained), or an event per committed update
(capture without a worker, pgq). Prints the machine and the exact command and writes a markdown
copy to bench/runs/<UTC time>-compare.md (bench/results/ with --quick; --output to choose).
Benchmarks print figures; tests never assert timings.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import random
import shlex
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run.py and legacy.py, when started as `python bench/compare.py`
    sys.path.insert(0, str(HERE))

import legacy  # noqa: E402
import psycopg  # noqa: E402
import run as run_module  # noqa: E402
from psycopg import errors, sql  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from processor import store  # noqa: E402
from processor.database import DatabaseUrl, connect  # noqa: E402

CONFIGS = ("no-trigger", "legacy", "legacy-locked", "capture", "capture-worker", "pgq")
BASE = "no-trigger"
MIGRATED = ("capture", "capture-worker")
WORKLOADS = ("single", "two-jobs", "wide")
FIRST, FINAL = legacy.STEPS[0], legacy.FINAL
UPDATE_SQL = run_module.UPDATE_SQL  # the writers' statement of bench/run.py: no updated_at
SEED = 18
APPLICATION = "outbox-bench-compare"

INDEX_SQL = "CREATE INDEX bench_jobs_variants_job_id_idx ON jobs_variants (job_id)"
DROP_LEGACY_TRIGGER_SQL = "DROP TRIGGER check_all_variants_done_trigger ON jobs_variants"

# The legacy function (tests/sql/legacy_schema.sql) with one statement first: lock the job row.
# Concurrent changes of one job's variants then take turns, and since every statement of a volatile
# PL/pgSQL function takes a new snapshot under READ COMMITTED, the count that follows the lock sees
# the variants the previous holder committed: no lost update, at the price of waits and deadlocks.
LEGACY_SCHEMA = Path(__file__).resolve().parents[1] / "tests" / "sql" / "legacy_schema.sql"
LOCK_JOB_ROW = "    PERFORM 1 FROM jobs WHERE job_id = NEW.job_id FOR UPDATE;\n"


def locked_function_sql() -> str:
    """The legacy function, its body starting with LOCK_JOB_ROW (written once, in legacy_schema.sql)."""
    text = LEGACY_SCHEMA.read_text(encoding="utf-8")
    start = text.index("CREATE FUNCTION check_all_variants_done()")
    function = text[start : text.index("$$;", start) + len("$$;")]
    assert function.count("\nBEGIN\n") == 1, "the legacy function changed shape"
    replaced = function.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
    return replaced.replace("\nBEGIN\n", "\nBEGIN\n" + LOCK_JOB_ROW)


# PgQ's C trigger: each update becomes an event row of the queue (urlencoded row, table, type).
PGQ_QUEUE = "variants"
PGQ_SQL = f"""
CREATE EXTENSION pgq;
SELECT pgq.create_queue('{PGQ_QUEUE}');
CREATE TRIGGER bench_pgq_variants AFTER UPDATE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION pgq.logutriga('{PGQ_QUEUE}');
"""

# What the job rows say against what their variants say (a job is done when all its variants are).
JOB_STATE_SQL = """
SELECT count(*),
       count(*) FILTER (WHERE r.finished AND j.status IS DISTINCT FROM 'done'),
       count(*) FILTER (WHERE NOT r.finished AND j.status = 'done')
FROM (SELECT job_id, bool_and(status = 'done') AS finished
      FROM jobs_variants WHERE job_id = ANY(%s) GROUP BY job_id) AS r
JOIN jobs AS j USING (job_id)
"""


@dataclass(frozen=True)
class Plan:
    """The sizes of the workloads; --quick shrinks them to a smoke run."""

    single_jobs: int = 1000
    single_variants: int = 10
    two_jobs_jobs: int = 32
    wide_jobs: int = 4
    wide_variants: int = 300
    warmup: float = 1.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(single_jobs=100, two_jobs_jobs=8, wide_jobs=2, warmup=0.2)


@dataclass(frozen=True)
class Workload:
    """The jobs one workload writes, and what one of its transactions does."""

    name: str
    jobs: tuple[legacy.Job, ...]
    jobs_per_transaction: int  # 2 for two-jobs: one variant in each of two jobs
    toggle: bool  # finish, or reopen when done; else a random status/step change
    description: str


def workloads(plan: Plan, writers: int, names: Sequence[str]) -> list[Workload]:
    """The named workloads, each with jobs of its own (seeded: the same rows in every database)."""
    rng = random.Random(SEED)
    built = {
        "single": Workload(
            "single",
            tuple(legacy.make_jobs(rng, plan.single_jobs, plan.single_variants)),
            1,
            False,
            f"1 variant per transaction, a status/step change; {plan.single_jobs:,} jobs x {plan.single_variants}",
        ),
        "two-jobs": Workload(
            "two-jobs",
            # One variant per writer in each job: writers meet on the job rows only.
            tuple(legacy.make_jobs(rng, plan.two_jobs_jobs, writers)),
            2,
            True,
            f"2 jobs per transaction in random order, a variant of each finished/reopened; "
            f"{plan.two_jobs_jobs} jobs x {writers}",
        ),
        "wide": Workload(
            "wide",
            tuple(legacy.make_jobs(rng, plan.wide_jobs, plan.wide_variants)),
            1,
            True,
            f"1 variant per transaction, finished/reopened; {plan.wide_jobs} jobs x {plan.wide_variants}",
        ),
    }
    return [built[name] for name in names]


class WriterState:
    """One writer's own variants of a workload, their current states, and its seeded choices.

    The seed depends on the workload and the writer only, so every config gets the same sequence of
    transactions (as far as it gets in its window).
    """

    def __init__(self, workload: Workload, index: int, writers: int) -> None:
        self.workload = workload
        self.rng = random.Random(f"{SEED}-{workload.name}-{index}")
        # Variant slots index, index + writers, ... of every job: no two writers share a variant.
        self.mine = [job.variants[index::writers] for job in workload.jobs if job.variants[index::writers]]
        self.states: dict[uuid.UUID, tuple[str, str]] = {v: ("running", FIRST) for vs in self.mine for v in vs}

    def next_transaction(self) -> list[tuple[uuid.UUID, str, str]]:
        """(variant, status, step) per job of the transaction, in the order to write them."""
        changes = []
        for variants in self.rng.sample(self.mine, self.workload.jobs_per_transaction):  # random jobs, random order
            variant = self.rng.choice(variants)
            status, step = self._next_state(self.states[variant])
            changes.append((variant, status, step))
        return changes

    def _next_state(self, current: tuple[str, str]) -> tuple[str, str]:
        if self.workload.toggle:
            return ("running", FIRST) if current[0] == "done" else ("done", FINAL)
        while True:  # always a change, so that every capture writes an event
            change = (self.rng.choice(("running", "done")), self.rng.choice(legacy.STEPS))
            if change != current:
                return change

    def committed(self, changes: Sequence[tuple[uuid.UUID, str, str]]) -> None:
        for variant, status, step in changes:
            self.states[variant] = (status, step)


@dataclass
class Window:
    """What one config's writers did in one window."""

    transactions: int
    seconds: float
    deadlocks: int
    serialization_failures: int
    server_cpu: float | None  # seconds of the writers' backends; None when not readable from here
    backlog: int | None = None  # capture-worker: events not applied yet at the end of the window

    @property
    def tx_per_second(self) -> float:
        return self.transactions / self.seconds if self.seconds else 0.0

    @property
    def server_cpu_us(self) -> float | None:
        return None if self.server_cpu is None else self.server_cpu * 1e6 / max(1, self.transactions)


@dataclass
class Config:
    """One config's database, its writers' connections and, for capture-worker, the worker."""

    name: str
    db: DatabaseUrl
    conns: list[psycopg.Connection[Any]]
    backends: list[int]
    states: dict[str, list[WriterState]]  # per workload, per writer
    observer: psycopg.Connection[Any]
    worker: legacy.WorkerProcess | None = None
    events_before: int | None = None  # capture, pgq: events before the first window
    updates: int = 0  # variant updates committed, warm-ups included


# Databases


def database_name(config: str) -> str:
    # The process id, as bench/run.py's: two runs on one server never drop each other's databases.
    return f"outbox_bench_compare_{config.replace('-', '_')}_{run_module.RUN_TAG}"


def pgq_available(admin_url: DatabaseUrl) -> bool:
    with connect(admin_url, application_name=APPLICATION) as conn:
        row = conn.execute("SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pgq')").fetchone()
    return bool(row and row[0])


def create_database(admin_url: DatabaseUrl, config: str) -> DatabaseUrl:
    """The config's empty database: migrated, or the legacy schema with the config's trigger."""
    name = database_name(config)
    if config in MIGRATED:
        return run_module.fresh_database(admin_url, name)
    db = legacy.legacy_database(admin_url, name)
    with connect(db, application_name=APPLICATION) as conn:
        conn.execute(INDEX_SQL)
        if config in ("no-trigger", "pgq"):
            conn.execute(DROP_LEGACY_TRIGGER_SQL)
        if config == "legacy-locked":
            conn.execute(locked_function_sql().encode())
        if config == "pgq":
            conn.execute(PGQ_SQL.encode())
    return db


def captured_events(conn: psycopg.Connection[Any], config: str) -> int | None:
    """Events capture or PgQ holds (nothing consumes them in these configs); None for the others."""
    if config == "capture":
        table = sql.Identifier("outbox_events")
    elif config == "pgq":
        row = conn.execute("SELECT queue_data_pfx FROM pgq.queue WHERE queue_name = %s", [PGQ_QUEUE]).fetchone()
        assert row is not None
        # The queue's parent table: its rotating child tables inherit it, so one count reads them all.
        table = sql.Identifier(*str(row[0]).split(".", 1))
    else:
        return None
    count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
    assert count is not None
    return int(count[0])


@contextlib.contextmanager
def prepared_configs(
    admin_url: DatabaseUrl, names: Sequence[str], loads: Sequence[Workload], writers: int, say: Callable[[str], None]
) -> Iterator[list[Config]]:
    """Every config's database loaded with every workload's jobs, connections open; all dropped on the way out."""
    jobs = [job for workload in loads for job in workload.jobs]
    with contextlib.ExitStack() as stack:

        def drop_all() -> None:
            for name in names:
                run_module.drop_database(admin_url, database_name(name))

        stack.callback(drop_all)  # registered first: runs last, after every connection is closed
        configs = []
        for name in names:
            started = time.perf_counter()
            db = create_database(admin_url, name)
            observer = stack.enter_context(connect(db, application_name=APPLICATION))
            legacy.load_jobs(observer, jobs, step=FIRST)
            config = Config(name=name, db=db, conns=[], backends=[], states={}, observer=observer)
            if name == "capture-worker":
                config.worker = stack.enter_context(legacy.running_worker(db))
                config.worker.wait_drained(observer)  # the inserts' events, before any window
            config.events_before = captured_events(observer, name)
            for index in range(writers):
                conn = stack.enter_context(connect(db, application_name=f"{APPLICATION}-writer-{index}"))
                config.conns.append(conn)
                config.backends.append(int(conn.execute("SELECT pg_backend_pid()").fetchone()[0]))  # type: ignore[index]
            config.states = {w.name: [WriterState(w, index, writers) for index in range(writers)] for w in loads}
            configs.append(config)
            say(f"{name}: database ready ({len(jobs):,} jobs) in {time.perf_counter() - started:.1f} s")
        yield configs


# Writing


def apply(conn: psycopg.Connection[Any], changes: Sequence[tuple[uuid.UUID, str, str]]) -> None:
    """One transaction: a lone update in autocommit (as bench/run.py's writers), else BEGIN ... COMMIT."""
    if len(changes) == 1:
        variant, status, step = changes[0]
        conn.execute(UPDATE_SQL, [status, step, variant])
        return
    with conn.transaction():
        for variant, status, step in changes:
            conn.execute(UPDATE_SQL, [status, step, variant])


def window(config: Config, workload: Workload, seconds: float) -> Window:
    """The config's writers running ``workload`` for ``seconds``: transactions, retries and server CPU."""
    states = config.states[workload.name]
    writers = len(config.conns)
    counts, deadlocks, failures, updates = [0] * writers, [0] * writers, [0] * writers, [0] * writers
    start = threading.Barrier(writers + 1, timeout=60)
    stop = threading.Event()
    raised: list[BaseException] = []

    def write(index: int) -> None:
        conn, state = config.conns[index], states[index]
        try:
            start.wait()
            while not stop.is_set():
                changes = state.next_transaction()
                while True:  # the same transaction again until it commits, as an application would
                    try:
                        apply(conn, changes)
                        break
                    except errors.DeadlockDetected:
                        deadlocks[index] += 1
                    except errors.SerializationFailure:
                        failures[index] += 1
                state.committed(changes)
                counts[index] += 1
                updates[index] += len(changes)
        except BaseException as exc:
            raised.append(exc)
            start.abort()

    threads = [threading.Thread(target=write, args=(index,)) for index in range(writers)]
    for thread in threads:
        thread.start()
    cpu_before = run_module.backend_cpu_seconds(config.backends)  # the writers wait at the barrier: idle
    with contextlib.suppress(threading.BrokenBarrierError):  # a writer failed: raised below
        start.wait()
    began = time.perf_counter()
    stop.wait(seconds)  # the measurement window, not synchronisation
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    cpu_after = run_module.backend_cpu_seconds(config.backends)
    if raised:
        raise raised[0]
    config.updates += sum(updates)
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    measured = Window(sum(counts), elapsed, sum(deadlocks), sum(failures), cpu)
    if config.worker is not None:
        # What the worker had not applied yet; caught up outside every config's window.
        config.worker.check()
        measured.backlog = store.work_pending(config.observer, 0)
        config.worker.wait_drained(config.observer)
    return measured


Results = dict[str, dict[str, list[Window]]]  # workload -> config -> one window per round


def measure(
    configs: Sequence[Config],
    loads: Sequence[Workload],
    *,
    rounds: int,
    seconds: float,
    warmup: float,
    say: Callable[[str], None],
) -> Results:
    for workload in loads:
        for config in configs:
            window(config, workload, warmup)  # caches, plans, the worker's pace; not counted
    results: Results = {w.name: {c.name: [] for c in configs} for w in loads}
    for number in range(rounds):
        for position, workload in enumerate(loads):
            # Every config once per round, in an order rotating with the round and the workload:
            # the host's noise (here: another engineer's test suite) falls on all configs alike.
            shift = (number + position) % len(configs)
            line = []
            for config in [*configs[shift:], *configs[:shift]]:
                measured = window(config, workload, seconds)
                results[workload.name][config.name].append(measured)
                line.append(f"{config.name} {measured.tx_per_second:,.0f}" + _deadlocks(measured))
            say(f"round {number + 1}, {workload.name}: " + ", ".join(line) + " tx/s")
    return results


def _deadlocks(measured: Window) -> str:
    return f" ({measured.deadlocks} deadlocks)" if measured.deadlocks else ""


# Correctness after two-jobs


def job_states(config: Config, workload: Workload) -> str:
    """What the config left behind for ``workload``'s jobs, in words."""
    if config.name in ("legacy", "legacy-locked", "capture-worker"):
        if config.worker is not None:
            config.worker.wait_drained(config.observer)  # the job state is the worker's to write
        ids = [job.job_id for job in workload.jobs]
        row = config.observer.execute(JOB_STATE_SQL, [ids]).fetchone()
        assert row is not None
        jobs, stuck, early = (int(value) for value in row)
        return (
            f"{stuck + early} of {jobs} jobs disagree with their variants "
            f"({stuck} all variants done but job not done, {early} job done but a variant not done)"
        )
    events = captured_events(config.observer, config.name)
    if events is not None and config.events_before is not None:
        added = events - config.events_before
        verdict = "one per update" if added == config.updates else "MISMATCH"
        return (
            f"{added:,} events for {config.updates:,} committed variant updates ({verdict}); "
            "job state needs a consumer, none ran"
        )
    return "n/a: nothing maintains job state"


# Output


@dataclass
class Report:
    """What is printed, kept for the markdown copy."""

    lines: list[str] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)


def summary_rows(per_config: dict[str, list[Window]]) -> list[list[str]]:
    rows = []
    base = per_config.get(BASE)
    for name, windows in per_config.items():
        rates = [w.tx_per_second for w in windows]
        if base is not None:
            ratios = [w.tx_per_second / max(b.tx_per_second, 1e-9) for w, b in zip(windows, base, strict=True)]
            ratio = f"{statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})"
        else:
            ratio = "n/a (no-trigger not run)"
        seconds = sum(w.seconds for w in windows)
        deadlocks = sum(w.deadlocks for w in windows)
        cpu = [w.server_cpu_us for w in windows]
        backlog = [w.backlog for w in windows if w.backlog is not None]
        rows.append(
            [
                name,
                ", ".join(f"{rate:,.0f}" for rate in rates),
                f"{statistics.median(rates):,.0f}",
                ratio,
                f"{deadlocks} ({deadlocks / seconds:.2f}/s)",
                str(sum(w.serialization_failures for w in windows)),
                "n/a" if any(c is None for c in cpu) else f"{statistics.median(c for c in cpu if c is not None):.1f}",
                f"{max(backlog):,}" if backlog else "",
            ]
        )
    return rows


SUMMARY_COLUMNS = [
    "config",
    "tx/s per round",
    "median tx/s",
    "/ no-trigger: median (rounds)",
    "deadlocks (per s)",
    "serialization failures (40001)",
    "server CPU us/tx",
    "backlog max",
]


def markdown(report: Report, title: str) -> str:
    """The printed lines verbatim, then the tables."""
    out = [f"# {title}", "", "```text", *report.lines, "```", ""]
    for caption, columns, rows in report.tables:
        out += [f"## {caption}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, 1 with --quick)")
    parser.add_argument("--seconds", type=float, default=None, help="per config, workload and round (10; 1 quick)")
    parser.add_argument("--writers", type=int, default=4, help="writer threads, each on its own connection")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"of {','.join(WORKLOADS)}")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"of {','.join(CONFIGS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round of 1 s: a smoke run")
    parser.add_argument("--output", type=Path, default=None, help="folder of the markdown copy (bench/runs)")
    args = parser.parse_args(argv)
    chosen = {"workloads": _names(parser, args.workloads, WORKLOADS), "configs": _names(parser, args.configs, CONFIGS)}
    if args.writers < 2:
        parser.error("--writers: at least 2 (two-jobs picks two jobs a writer has variants in)")
    plan = Plan.quick() if args.quick else Plan()
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 10.0)
    output = args.output or (run_module.RESULTS if args.quick else HERE / "runs")

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log file: no wrapping of the tables
    report = Report()

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)  # one line each, however long
        report.lines.append(line)

    admin_url = run_module.server()
    machine = run_module.machine(admin_url)
    started = dt.datetime.now(dt.UTC)
    command = shlex.join(
        [sys.executable, sys.argv[0] if argv is None else "bench/compare.py", *(sys.argv[1:] if argv is None else argv)]
    )
    with connect(admin_url, application_name=APPLICATION) as conn:
        deadlock_timeout = conn.execute("SHOW deadlock_timeout").fetchone()[0]  # type: ignore[index]
    say(
        f"machine: {machine['cores']} cores, PostgreSQL {machine['postgresql']}, Python {machine['python']}, "
        f"psycopg {machine['psycopg']} ({machine['platform']}; "
        f"load average at start {machine['load_average_at_start']})"
    )
    say(f"command: {command}")
    say(f"started {started.isoformat(timespec='seconds')}")
    say(
        f"{rounds} round(s), {args.writers} writers x {seconds:g} s per config, workload and round; "
        f"deadlock_timeout {deadlock_timeout}; every database has an index on jobs_variants(job_id)"
    )
    say(
        "server CPU: the writers' backends only (not capture-worker's worker); backlog max: events the worker "
        "had not applied at the end of a window"
    )
    configs = list(chosen["configs"])
    if "pgq" in configs and not pgq_available(admin_url):
        configs.remove("pgq")
        say("pgq: skipped, the server has no pgq extension (Debian: apt-get install postgresql-15-pgq3)")
    loads = workloads(plan, args.writers, chosen["workloads"])

    with prepared_configs(admin_url, configs, loads, args.writers, say) as prepared:
        results = measure(prepared, loads, rounds=rounds, seconds=seconds, warmup=plan.warmup, say=say)
        checks = [
            [config.name, job_states(config, workload)]
            for workload in loads
            if workload.name == "two-jobs"
            for config in prepared
        ]

    for workload in loads:
        caption = f"{workload.name}: {workload.description}"
        rows = summary_rows(results[workload.name])
        report.tables.append((caption, SUMMARY_COLUMNS, rows))
        table = Table(*SUMMARY_COLUMNS, title=caption, title_justify="left")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if checks:
        caption = "left behind at the end of two-jobs"
        report.tables.append((caption, ["config", "check"], checks))
        table = Table("config", "check", title=caption, title_justify="left")
        for row in checks:
            table.add_row(*row)
        console.print(table)
    took = (dt.datetime.now(dt.UTC) - started).total_seconds()
    say(f"load average at the end {[round(load, 2) for load in os.getloadavg()]}; took {took:.0f} s")
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{started.strftime('%Y-%m-%dT%H%M')}-compare.md"
    path.write_text(markdown(report, "Writer throughput side by side (bench/compare.py)") + "\n")
    console.print(f"written {path}", markup=False, highlight=False)
    return 0


def _names(parser: argparse.ArgumentParser, text: str, known: Sequence[str]) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        parser.error(f"unknown or no name(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return [name for name in known if name in names]  # the documented order, the base first


if __name__ == "__main__":
    sys.exit(main())
