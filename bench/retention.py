"""What `outbox prune` costs, per source tree: row-by-row DELETE (before issue 18) or segments (after).

    python bench/retention.py [--trees before=PATH,after=PATH] [--events 1000000] [--runs 3] [--writers 4]
    python bench/retention.py --quick          # 20,000 events, 1 run, this tree only: a smoke run

With --trees omitted, only the tree this script sits in is measured, as `after`. Each tree's own
code runs as subprocesses (`python -m processor.cli migrate|run|prune`, cwd and PYTHONPATH the tree,
its .venv's interpreter when it has one, else this one; the bench checks which `processor` they
import).

Per tree, once: a scratch database migrated by the tree, --events events written as capture writes
them (10 per variant in 10 rounds, 10 variants per job, one INSERT ... SELECT) and applied by the
tree's worker (`run --until-idle`), then VACUUM ANALYZE; it is the template of every measurement of
that tree. In a segmented tree (migration 0015) the segment holding them is closed first, as a
retention round would have closed it: the writers below then fill a segment of their own, which the
prune closes and keeps (its events are not applied: no worker runs), as production's next round
would.

Per run, for each case (no snapshot; a REPEATABLE READ session that ran one query on `jobs` and
stays open throughout) and each tree in turn (the trees' order alternates from one slot to the
next): a fresh copy of the template (CREATE DATABASE ... TEMPLATE, a file copy), VACUUM ANALYZE,
CHECKPOINT; --writers threads updating their own variants (plain SQL, one variant per autocommit
transaction, captured by the tree's trigger); their rate over a baseline window, then `prune
--older-than 0s` as a subprocess. Measured: its wall time (from spawn, and from the moment its
session connected: the interpreter's start-up is about a second); WAL written meanwhile, the
cluster's (pg_current_wal_lsn before and after) and the prune's own: pg_walinspect reads the records
back and splits them by transaction (the writers report their transaction ids; any other transaction
that wrote a block of the scratch database is the prune's), a temporary replication slot keeping
them until then (the server drops it with the bench's session); the writers' rate while its session
was connected, over the baseline's (the ratio), and the slowest full second; outbox_events (every
partition) and outbox_variant_baseline bytes before and after; dead tuples in outbox_events and
outbox_job_transitions just after (pgstattuple, else the statistics' n_dead_tup); then the same
after a plain VACUUM with the snapshot still held (a held snapshot keeps what DELETE left; TRUNCATE
leaves nothing to keep).

Noise. The server is shared: the cluster's WAL includes the writers' and any other session's (the
other databases'); the prune's own figure does not, but counts an autoanalyze of the scratch
database if one ran meanwhile. Without pg_walinspect the prune's WAL is the cluster's less the
writers' share estimated from their WAL per transaction in the baseline window (rough: full-page
writes after the CHECKPOINT weigh on the first seconds). Writer rates move with the host's load
(printed at the start and the end), and on a small host the prune's own process and backend take CPU
from the writers; autovacuum may visit a table between the prune and the dead-tuple count. Figures
are medians over --runs. Prints a table, the machine and the exact command, and writes a markdown
copy to bench/runs/<UTC time>-retention.md (bench/results/ with --quick; --output to choose).
Benchmarks print figures; tests never assert timings.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime as dt
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # run.py and transition_drain.py, when started as `python bench/retention.py`
    sys.path.insert(0, str(HERE))

import psycopg  # noqa: E402
import run as run_module  # noqa: E402
from psycopg import sql  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transition_drain import git_state, tree_env  # noqa: E402

from processor.database import DatabaseUrl, connect  # noqa: E402

APPLICATION = "outbox-bench-retention"
TAG = os.getpid()  # in the scratch databases' names: two runs on one server never drop each other's
EVENTS_PER_VARIANT = 10
VARIANTS_PER_JOB = 10
WRITER_VARIANTS = 1000  # the writers' own variants, shared out among them
CASES = ("no snapshot", "held snapshot")
# bench/run.py's writer statement; the transaction id it returns tells its WAL from the prune's.
WRITE_SQL = run_module.UPDATE_SQL + " RETURNING pg_current_xact_id()::xid::text"
SUBPROCESS_TIMEOUT = 3600
COPY = f"outbox_bench_retention_{TAG}"  # the database of the measurement in progress

# The jobs and variants without capture (the events come next, in bulk), then N events the way
# capture writes them (tests/integration/test_migrate_segments.py's BULK_EVENTS, with each job's
# partition): every event of a variant carries the variant's state, so the worker's fold agrees
# with jobs_variants. One transaction each; the worker applies them afterwards. The events come in
# rounds (every variant's first, then every variant's second, ...; nextval follows the ORDER BY):
# a variant's changes are spread over the segment among the others', as over a variant's life, so
# each chunk a prune folds moves a variant's baseline row again (10 writes a variant, both trees).
LOAD_SQL = [
    "ALTER TABLE jobs_variants DISABLE TRIGGER USER",
    """
    INSERT INTO jobs (job_id, status) SELECT gen_random_uuid(), 'queued' FROM generate_series(1, {jobs});
    INSERT INTO jobs_variants (job_variants_id, job_id, status, current_step)
        SELECT gen_random_uuid(), job_id, 'running', 'ingest' FROM jobs, generate_series(1, {variants_per_job});
    """,
    "ALTER TABLE jobs_variants ENABLE TRIGGER USER",
    """
    INSERT INTO outbox_events (event_type, schema_version, partition, job_id, variant_id, variant_version, payload)
    SELECT 'variant_changed', 1, outbox_partition_of(v.job_id), v.job_id, v.job_variants_id,
           nextval('outbox_variant_versions'), jsonb_build_object('status', v.status, 'step', v.current_step)
    FROM jobs_variants AS v CROSS JOIN generate_series(1, {per_variant}) AS round
    ORDER BY round
    """,
]
# Events the tree's worker has not applied (not visible in their partition's done snapshot).
UNAPPLIED_SQL = """
SELECT count(*) FROM outbox_events AS e LEFT JOIN outbox_checkpoints AS c USING (partition)
WHERE c.partition IS NULL OR NOT pg_visible_in_snapshot(e.txid, c.done_snapshot)
"""
PRUNE_BACKEND_SQL = """
SELECT extract(epoch FROM min(backend_start)) FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE 'outbox-prune:%%'
"""
LEAVES_SQL = """
SELECT relid::regclass::text FROM pg_partition_tree(%(table)s::regclass) WHERE isleaf
UNION ALL
SELECT %(table)s::text WHERE (SELECT relkind FROM pg_class WHERE oid = %(table)s::regclass) <> 'p'
"""
OUTBOX_TABLES = ("outbox_events", "outbox_job_transitions")
# The WAL records of [start, end), read back once (pg_walinspect) into a temporary table: the
# transaction, the length, and the first block's database and file (none for a commit record).
WAL_READ_SQL = r"""
CREATE TEMP TABLE bench_wal AS
SELECT r.xid::text::bigint AS xid, r.record_length AS bytes, b.block[1]::oid AS db, b.block[2]::oid AS filenode
FROM pg_get_wal_records_info({start}::pg_lsn, {end}::pg_lsn) AS r
LEFT JOIN LATERAL regexp_match(r.block_ref, 'rel \d+/(\d+)/(\d+)') AS b (block) ON true
"""
# Whose it is: the writers' (the xids they report), the prune's (every other transaction that wrote
# a block of this database: the prune is the only other writer in it; an autoanalyze would count
# too), this database's records outside any transaction (page pruning: either side's), and every
# record of the cluster. A transaction's commit record carries no block: it counts with its xid.
WAL_SPLIT_SQL = """
WITH per_xid AS (
    SELECT xid, bool_or(db = %(db)s) AS ours, sum(bytes) AS bytes FROM bench_wal WHERE xid <> 0 GROUP BY xid
)
SELECT coalesce(sum(p.bytes) FILTER (WHERE w.xid IS NULL AND p.ours), 0),
       coalesce(sum(p.bytes) FILTER (WHERE w.xid IS NOT NULL), 0),
       (SELECT coalesce(sum(bytes), 0) FROM bench_wal WHERE xid = 0 AND db = %(db)s),
       (SELECT coalesce(sum(bytes), 0) FROM bench_wal)
FROM per_xid AS p LEFT JOIN bench_writer_xids AS w ON w.xid = p.xid
"""
# The prune's WAL by the relation its records touch (a truncated segment's old file maps to none).
PRUNE_WAL_BY_RELATION_SQL = """
WITH prune AS (
    SELECT xid FROM bench_wal WHERE xid <> 0 GROUP BY xid HAVING bool_or(db = %(db)s)
    EXCEPT SELECT xid FROM bench_writer_xids
)
SELECT coalesce(pg_filenode_relation(0, w.filenode)::text, 'other'), sum(w.bytes)
FROM bench_wal AS w JOIN prune USING (xid)
GROUP BY 1 ORDER BY 2 DESC LIMIT 4
"""


@dataclass(frozen=True)
class Plan:
    events: int
    warmup: float  # seconds of writing before the baseline window: connections, caches, plans
    baseline: float  # seconds of the baseline window


@dataclass(frozen=True)
class Tree:
    name: str
    path: Path
    python: str

    @classmethod
    def parse(cls, pair: str) -> Tree:
        name, _, path = pair.partition("=")
        resolved = Path(path).resolve()
        own = resolved / ".venv" / "bin" / "python"
        return cls(name, resolved, str(own) if own.exists() else sys.executable)


# The trees' own code, as subprocesses


def cli_env(tree: Tree, db: DatabaseUrl) -> dict[str, str]:
    """The tree first on the path (before any editable install), and only the settings the bench means."""
    env = {k: v for k, v in tree_env(tree.path).items() if not k.startswith("OUTBOX_")}
    env.update(
        OUTBOX_DATABASE_URL=db.url.render_as_string(hide_password=False),
        OUTBOX_PIPELINE_STEPS=run_module.STEPS,
        OUTBOX_LOG_LEVEL="WARNING",
    )
    return env


def cli(tree: Tree, db: DatabaseUrl, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [tree.python, "-m", "processor.cli", *args],
        cwd=tree.path,
        env=cli_env(tree, db),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{tree.name}: outbox {' '.join(args)} failed: {(done.stdout + done.stderr)[-2000:]}")
    return done


def imported_from(tree: Tree, admin_url: DatabaseUrl) -> str:
    """Where the tree's subprocesses import `processor` from; refused unless it is the tree itself."""
    done = subprocess.run(
        [tree.python, "-c", "import processor; print(processor.__file__)"],
        cwd=tree.path,
        env=cli_env(tree, admin_url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    where = done.stdout.strip()
    if done.returncode != 0 or not Path(where).resolve().is_relative_to(tree.path):
        raise RuntimeError(f"{tree.name}: its subprocesses import processor from {where or done.stderr[-500:]}")
    return where


# Databases


def create_empty(admin_url: DatabaseUrl, name: str) -> DatabaseUrl:
    """An empty database (run_module.fresh_database would migrate it with this tree's code)."""
    run_module.drop_database(admin_url, name)
    with connect(admin_url, application_name=APPLICATION) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return DatabaseUrl(admin_url.url.set(database=name))


def scalar(conn: psycopg.Connection[Any], query: str, params: Sequence[Any] = ()) -> Any:
    row = conn.execute(query.encode(), params).fetchone()
    return row[0] if row else None


def segmented(conn: psycopg.Connection[Any]) -> bool:
    return bool(scalar(conn, "SELECT to_regprocedure('outbox_segments_rotate(text)') IS NOT NULL"))


def build_template(admin_url: DatabaseUrl, tree: Tree, events: int, say: Callable[[str], None]) -> tuple[str, int]:
    """The tree's template: migrated by it, about ``events`` applied events, analysed; its name and event count."""
    name = f"outbox_bench_retention_tpl_{tree.name}_{TAG}"
    db = create_empty(admin_url, name)
    started = time.perf_counter()
    cli(tree, db, "migrate")
    variants = max(1, events // EVENTS_PER_VARIANT)
    jobs = max(1, variants // VARIANTS_PER_JOB)
    with connect(db, application_name=APPLICATION) as conn:
        for statement in LOAD_SQL:
            conn.execute(
                statement.format(jobs=jobs, variants_per_job=VARIANTS_PER_JOB, per_variant=EVENTS_PER_VARIANT).encode()
            )
        written = int(scalar(conn, "SELECT count(*) FROM outbox_events"))
        loaded = time.perf_counter()
        drained = cli(tree, db, "run", "--until-idle")
        processed = re.search(r"processed (\d+) events", drained.stdout)
        unapplied = int(scalar(conn, UNAPPLIED_SQL))
        dead_letters = int(scalar(conn, "SELECT count(*) FROM outbox_dead_letters"))
        if unapplied or dead_letters or not processed or int(processed.group(1)) != written:
            raise RuntimeError(
                f"{tree.name}: worker left {unapplied} unapplied, {dead_letters} dead letters: {drained}"
            )
        if segmented(conn):
            # Close the segment holding the loaded events, as a retention round would have: the
            # writers then fill a segment of their own (see the module's docstring).
            conn.execute("SELECT outbox_segments_rotate('outbox_events')")
        conn.execute("VACUUM ANALYZE")
    say(
        f"template {tree.name}: {written:,} events written in {loaded - started:.1f} s (with migrate), "
        f"applied by the tree's worker in {time.perf_counter() - loaded:.1f} s"
    )
    return name, written


def leaves(conn: psycopg.Connection[Any], table: str) -> list[str]:
    """The tables holding ``table``'s rows: its partitions, or itself (pg_partition_tree lists no plain table)."""
    return [row[0] for row in conn.execute(LEAVES_SQL, {"table": table})]


def relation_bytes(conn: psycopg.Connection[Any], table: str) -> int:
    """Heap, indexes and TOAST of ``table``, every partition of it."""
    query = "SELECT coalesce(sum(pg_total_relation_size(t::regclass)), 0) FROM unnest(%s::text[]) AS t"
    return int(scalar(conn, query, [leaves(conn, table)]))


def dead_tuples(conn: psycopg.Connection[Any], tables: Sequence[str], exact: bool) -> int:
    """Dead tuples in ``tables`` (every partition): pgstattuple reads the pages; else the statistics."""
    names = [leaf for table in tables for leaf in leaves(conn, table)]
    if exact:
        return sum(int(scalar(conn, "SELECT dead_tuple_count FROM pgstattuple(%s::regclass)", [n])) for n in names)
    time.sleep(1.0)  # backends send their counts at most once a second (and at exit)
    conn.execute("SELECT pg_stat_clear_snapshot()")
    query = "SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables WHERE relid = ANY(%s::regclass[])"
    return int(scalar(conn, query, [names]))


def wal_lsn(conn: psycopg.Connection[Any]) -> str:
    return str(scalar(conn, "SELECT pg_current_wal_lsn()::text"))


def wal_bytes(conn: psycopg.Connection[Any], start: str, end: str) -> int:
    return int(scalar(conn, "SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)", [end, start]))


def wal_split(
    conn: psycopg.Connection[Any], writers: Writers, start: str, end: str
) -> tuple[dict[str, float], str] | str:
    """The WAL of [start, end) by who wrote it (WAL_SPLIT_SQL), in MB, and where the prune's went;
    else why it could not be read (no pg_walinspect, or a checkpoint recycled the segments)."""
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        conn.execute("DROP TABLE IF EXISTS bench_wal")
        conn.execute(sql.SQL(WAL_READ_SQL).format(start=sql.Literal(start), end=sql.Literal(end)))
    except psycopg.Error as exc:
        return f"pg_walinspect: {str(exc).strip()}"
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS bench_writer_xids (xid bigint)")
    conn.execute("TRUNCATE bench_writer_xids")
    with conn.cursor().copy("COPY bench_writer_xids (xid) FROM STDIN") as copy:
        for xids in writers.xids:
            for xid in xids:
                copy.write_row((xid,))
    conn.execute("ANALYZE bench_writer_xids, bench_wal")
    db = {"db": scalar(conn, "SELECT oid FROM pg_database WHERE datname = current_database()")}
    row = conn.execute(WAL_SPLIT_SQL, db).fetchone()
    assert row is not None
    keys = ("wal_prune_mb", "wal_writers_mb", "wal_no_xid_mb", "wal_records_mb")
    figures = {key: int(value) / 1e6 for key, value in zip(keys, row, strict=True)}
    where = ", ".join(f"{name} {int(size) / 1e6:.1f}" for name, size in conn.execute(PRUNE_WAL_BY_RELATION_SQL, db))
    conn.execute("DROP TABLE bench_wal")
    return figures, f"the prune's WAL by relation (MB): {where}"


@contextlib.contextmanager
def wal_kept(db: DatabaseUrl) -> Iterator[str | None]:
    """A temporary physical replication slot while it lasts: no checkpoint recycles the WAL of the
    measurement before wal_split reads it back (the shared server checkpoints often: every CREATE
    DATABASE does). Temporary: the server drops it when this session ends, however the bench ends.
    Yields why there is none, if it could not be made."""
    with connect(db, application_name=f"{APPLICATION}-slot") as conn:
        try:
            conn.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", [f"outbox_bench_{TAG}"])
            note = None
        except psycopg.Error as exc:
            note = f"no replication slot to keep the WAL: {str(exc).strip()}"
        yield note


# Writers and the snapshot


class Writers:
    """Threads on their own autocommit connections, each updating its own variants, every commit timed."""

    def __init__(self, db: DatabaseUrl, variants: Sequence[Any], count: int) -> None:
        self.db = db
        self.shares = [list(variants[i::count]) for i in range(count)]
        self.commits: list[list[float]] = [[] for _ in range(count)]
        self.xids: list[list[int]] = [[] for _ in range(count)]  # to tell their WAL from the prune's
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._write, args=(i,), daemon=True) for i in range(count)]

    def __enter__(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _write(self, index: int) -> None:
        rng = random.Random(index)
        steps = run_module.STEPS.split(",")
        last: dict[Any, tuple[str, str]] = {}
        try:
            with connect(self.db, application_name=f"{APPLICATION}-writer-{index}") as conn:
                while not self.stop.is_set():
                    variant = rng.choice(self.shares[index])
                    change = (rng.choice(("running", "done")), rng.choice(steps))
                    if change == last.get(variant):
                        continue  # every write changes the variant, so that capture appends an event
                    xid = scalar(conn, WRITE_SQL, [*change, variant])
                    last[variant] = change
                    self.commits[index].append(time.perf_counter())
                    self.xids[index].append(int(xid))
        except BaseException as exc:
            self.errors.append(exc)

    def count(self, start: float, end: float) -> int:
        # Each thread's commit times are in order: two binary searches per thread.
        return sum(bisect.bisect_left(times, end) - bisect.bisect_left(times, start) for times in self.commits)

    def rate(self, start: float, end: float) -> float:
        return self.count(start, end) / (end - start) if end > start else 0.0

    def slowest_second(self, start: float, end: float) -> float:
        """The lowest rate over the full seconds from ``start``; the whole interval's if it is shorter."""
        seconds = int(end - start)
        if seconds < 1:
            return self.rate(start, end)
        return min(self.rate(start + k, start + k + 1) for k in range(seconds))


@contextlib.contextmanager
def held_snapshot(db: DatabaseUrl, hold: bool) -> Iterator[None]:
    """A REPEATABLE READ transaction that read `jobs` once and stays open (its xmin holds back VACUUM)."""
    if not hold:
        yield
        return
    with connect(db, application_name=f"{APPLICATION}-snapshot", autocommit=False) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SELECT count(*) FROM jobs").fetchone()
        try:
            yield
        finally:
            conn.rollback()


class PruneWatch:
    """When the prune's session connected, on this process's perf_counter clock (polled every 20 ms).

    pg_stat_activity.backend_start is exact; the poll only has to see the session once. The server's
    clock is mapped to perf_counter by one round trip at the start.
    """

    def __init__(self, db: DatabaseUrl) -> None:
        self.conn = connect(db, application_name=f"{APPLICATION}-watch")
        before = time.perf_counter()
        server_now = float(scalar(self.conn, "SELECT extract(epoch FROM clock_timestamp())"))
        self.offset = (before + time.perf_counter()) / 2 - server_now
        self.connected: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.is_set() and self.connected is None:
            started = scalar(self.conn, PRUNE_BACKEND_SQL)
            if started is not None:
                self.connected = float(started) + self.offset
            self.stop.wait(0.02)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.conn.close()


# One measurement


@dataclass
class Measured:
    tree: str
    case: str
    run: int
    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # the prune's lines about segments it kept; WAL estimated


def outbox_state(conn: psycopg.Connection[Any], exact: bool) -> dict[str, float]:
    return {
        "events_bytes": relation_bytes(conn, "outbox_events"),
        "baseline_bytes": relation_bytes(conn, "outbox_variant_baseline"),
        "dead_tuples": dead_tuples(conn, OUTBOX_TABLES, exact),
    }


def prepare_copy(admin_url: DatabaseUrl, template: str) -> tuple[DatabaseUrl, bool]:
    """A fresh copy of the template, analysed and checkpointed; whether pgstattuple is there."""
    db = run_module.fresh_database(admin_url, COPY, template=template)
    with connect(db, application_name=APPLICATION) as conn:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
            exact = True
        except psycopg.Error:
            exact = False  # not installed on this server: dead tuples from the statistics
        conn.execute("VACUUM ANALYZE")
        # The prune's WAL should not carry the full-page images of the copy's first changes after
        # some unrelated checkpoint: start from a fresh one.
        conn.execute("CHECKPOINT")
    return db, exact


def prune_under_writers(
    tree: Tree, db: DatabaseUrl, conn: psycopg.Connection[Any], plan: Plan, writers: int
) -> tuple[dict[str, float], str, list[str]]:
    """The writers' baseline window, then the prune: timings, WAL and rates; its output; notes (segments kept)."""
    variants = [row[0] for row in conn.execute("SELECT job_variants_id FROM jobs_variants LIMIT %s", [WRITER_VARIANTS])]
    with wal_kept(db) as no_slot:
        with Writers(db, variants, writers) as writing:
            time.sleep(plan.warmup)  # measurement windows, not synchronisation
            base = (time.perf_counter(), wal_lsn(conn))
            time.sleep(plan.baseline)
            before = (time.perf_counter(), wal_lsn(conn))
            watch = PruneWatch(db)
            try:
                spawned = time.perf_counter()
                done = cli(tree, db, "prune", "--older-than", "0s")
                exited = time.perf_counter()
            finally:
                watch.close()
            after = (time.perf_counter(), wal_lsn(conn))
        if writing.errors:
            raise writing.errors[0]
        wal, notes = wal_figures(conn, writing, base, before, after)
    connected = watch.connected if watch.connected is not None else spawned
    base_rate = writing.rate(base[0], before[0])
    figures = {
        "prune_seconds": exited - spawned,
        "prune_seconds_connected": exited - connected,
        **wal,
        "writer_tx_per_second_before": base_rate,
        "writer_ratio": writing.rate(connected, exited) / base_rate if base_rate else 0.0,
        "writer_min_1s_tx_per_second": writing.slowest_second(connected, exited),
    }
    notes = ([no_slot] if no_slot else []) + notes
    notes += [line.strip() for line in done.stdout.splitlines() if line.startswith("kept ")]
    return figures, done.stdout, notes


def wal_figures(
    conn: psycopg.Connection[Any],
    writing: Writers,
    base: tuple[float, str],
    before: tuple[float, str],
    after: tuple[float, str],
) -> tuple[dict[str, float], list[str]]:
    """WAL in MB from ``before`` to ``after`` (time, LSN): the cluster's, and by who wrote it.

    Without pg_walinspect the prune's is the cluster's less the writers' share, estimated from
    their WAL per transaction in the baseline window (``base`` to ``before``).
    """
    total = wal_bytes(conn, before[1], after[1])
    split = wal_split(conn, writing, before[1], after[1])
    if isinstance(split, tuple):
        return {"wal_mb": total / 1e6, **split[0]}, [split[1]]
    per_tx = wal_bytes(conn, base[1], before[1]) / max(1, writing.count(base[0], before[0]))
    writers = per_tx * writing.count(before[0], after[0])
    estimated = {
        "wal_mb": total / 1e6,
        "wal_prune_mb": max(0.0, total - writers) / 1e6,
        "wal_writers_mb": writers / 1e6,
        "wal_no_xid_mb": float("nan"),
        "wal_records_mb": float("nan"),
    }
    return estimated, [f"WAL estimated: {split}"]


def measure(
    admin_url: DatabaseUrl, tree: Tree, template: str, case: str, run: int, plan: Plan, writers: int
) -> Measured:
    result = Measured(tree.name, case, run)
    try:
        db, exact = prepare_copy(admin_url, template)
        with connect(db, application_name=APPLICATION) as conn:
            before = outbox_state(conn, exact)
            with held_snapshot(db, hold=case == "held snapshot"):
                figures, output, result.notes = prune_under_writers(tree, db, conn, plan, writers)
                after = outbox_state(conn, exact)
                # With the snapshot still held: what VACUUM can give back of what the prune left.
                conn.execute(f"VACUUM {', '.join(OUTBOX_TABLES)}".encode())
                vacuumed = outbox_state(conn, exact)
    finally:
        run_module.drop_database(admin_url, COPY)
    pruned = re.search(r"pruned (\d+) events", output)
    result.figures = {
        **figures,
        "pruned_events": float(pruned.group(1)) if pruned else -1.0,
        "events_mb_before": before["events_bytes"] / 1e6,
        "events_mb_after": after["events_bytes"] / 1e6,
        "baseline_mb_before": before["baseline_bytes"] / 1e6,
        "baseline_mb_after": after["baseline_bytes"] / 1e6,
        "dead_tuples_before": before["dead_tuples"],
        "dead_tuples_after": after["dead_tuples"],
        "dead_tuples_after_vacuum": vacuumed["dead_tuples"],
        "events_mb_after_vacuum": vacuumed["events_bytes"] / 1e6,
    }
    return result


def describe(m: Measured, events: int) -> str:
    f = m.figures
    pruned = int(f["pruned_events"])
    return (
        f"run {m.run}, {m.case}, {m.tree}: prune {f['prune_seconds']:.2f} s ({f['prune_seconds_connected']:.2f} s from "
        f"its connection), pruned {pruned:,} of {events:,} loaded events{'' if pruned == events else ' (!)'}; "
        f"WAL during it: the prune's {f['wal_prune_mb']:.1f} MB, the writers' {f['wal_writers_mb']:.1f} MB, this "
        f"database's outside transactions {f['wal_no_xid_mb']:.1f} MB, the cluster's {f['wal_mb']:.1f} MB; writers "
        f"{f['writer_tx_per_second_before']:,.0f} tx/s before, ratio {f['writer_ratio']:.3f} during, slowest second "
        f"{f['writer_min_1s_tx_per_second']:,.0f} tx/s; outbox_events {f['events_mb_before']:.1f} -> "
        f"{f['events_mb_after']:.1f} MB ({f['events_mb_after_vacuum']:.1f} after VACUUM); baseline "
        f"{f['baseline_mb_before']:.1f} -> {f['baseline_mb_after']:.1f} MB; dead tuples "
        f"{f['dead_tuples_before']:,.0f} -> {f['dead_tuples_after']:,.0f} ({f['dead_tuples_after_vacuum']:,.0f} "
        f"after VACUUM); {'; '.join(m.notes) or 'no segment kept'}; load {[round(x, 2) for x in os.getloadavg()]}"
    )


# Summary


COLUMNS = [
    "tree",
    "snapshot",
    "prune s: process / from its connection",
    "WAL MB during prune: the prune's / writers' / cluster",
    "writer tx/s before",
    "writer ratio during prune",
    "slowest 1-s writer tx/s",
    "outbox_events MB before / after",
    "baseline MB after",
    "dead tuples after prune",
    "after VACUUM (snapshot still held, if any): dead tuples / outbox_events MB",
]


def summary_rows(measured: Sequence[Measured], trees: Sequence[Tree]) -> list[list[str]]:
    rows = []
    for case in CASES:
        for tree in trees:
            mine = [m.figures for m in measured if (m.tree, m.case) == (tree.name, case)]
            if not mine:
                continue

            def med(key: str, mine: list[dict[str, float]] = mine) -> float:
                return statistics.median(f[key] for f in mine)

            rows.append([
                tree.name,
                case,
                f"{med('prune_seconds'):.2f} / {med('prune_seconds_connected'):.2f}",
                f"{med('wal_prune_mb'):.1f} / {med('wal_writers_mb'):.1f} / {med('wal_mb'):.1f}",
                f"{med('writer_tx_per_second_before'):,.0f}",
                f"{med('writer_ratio'):.3f}",
                f"{med('writer_min_1s_tx_per_second'):,.0f}",
                f"{med('events_mb_before'):.1f} / {med('events_mb_after'):.1f}",
                f"{med('baseline_mb_after'):.1f}",
                f"{med('dead_tuples_after'):,.0f}",
                f"{med('dead_tuples_after_vacuum'):,.0f} / {med('events_mb_after_vacuum'):.1f}",
            ])  # fmt: skip
    return rows


def markdown(lines: Sequence[str], caption: str, rows: Sequence[Sequence[str]]) -> str:
    """The printed lines verbatim, then the table (as bench/compare.py writes its copy)."""
    out = ["# Retention: `outbox prune` under writers (bench/retention.py)", "", "```text", *lines, "```", ""]
    out += [f"## {caption}", "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", default=f"after={ROOT}", help="NAME=PATH pairs, comma-separated (this tree)")
    parser.add_argument("--events", type=int, default=None, help="applied events to prune (1,000,000; 20,000 quick)")
    parser.add_argument("--runs", type=int, default=None, help="runs per tree and case (3; 1 with --quick)")
    parser.add_argument("--writers", type=int, default=4, help="writer threads, each on its own connection")
    parser.add_argument("--quick", action="store_true", help="20,000 events, 1 run, short windows: a smoke run")
    parser.add_argument("--output", type=Path, default=None, help="folder of the markdown copy (bench/runs)")
    args = parser.parse_args(argv)
    trees = [Tree.parse(pair) for pair in args.trees.split(",") if pair.strip()]
    events = args.events if args.events is not None else (20_000 if args.quick else 1_000_000)
    plan = Plan(events, 0.5, 2.0) if args.quick else Plan(events, 1.0, 5.0)
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    output = args.output or (run_module.RESULTS if args.quick else HERE / "runs")

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log file: no wrapping of the table
    lines: list[str] = []

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
        lines.append(line)

    admin_url = run_module.server()
    machine = run_module.machine(admin_url)
    started = dt.datetime.now(dt.UTC)
    command = shlex.join(
        [
            sys.executable,
            sys.argv[0] if argv is None else "bench/retention.py",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    say(
        f"machine: {machine['cores']} cores, PostgreSQL {machine['postgresql']}, Python {machine['python']}, "
        f"psycopg {machine['psycopg']} ({machine['platform']}; load average at start "
        f"{machine['load_average_at_start']})"
    )
    say(f"command: {command}")
    say(f"started {started.isoformat(timespec='seconds')}")
    for tree in trees:
        where = imported_from(tree, admin_url)
        say(f"tree {tree.name}: {tree.path} ({git_state(tree.path)}), {tree.python}, imports {where}")
    say(
        f"{events:,} applied events, {EVENTS_PER_VARIANT} per variant; {args.writers} writers on {WRITER_VARIANTS} "
        f"variants, {plan.warmup:g} s warm-up, {plan.baseline:g} s baseline; {runs} run(s) per tree and case"
    )
    say(
        "WAL: from the prune's spawn to its exit, split by transaction with pg_walinspect (the writers' xids; the "
        "prune's: the other transactions writing this database); the cluster's: pg_current_wal_lsn before and "
        "after, other sessions on the shared server included. Writer ratio and slowest second: from the prune's "
        "connection to its exit, over the baseline window's rate"
    )

    measured: list[Measured] = []
    templates: dict[str, tuple[str, int]] = {}  # tree -> (template database, events in it)
    try:
        for tree in trees:
            templates[tree.name] = build_template(admin_url, tree, events, say)
        slot = 0
        for number in range(1, runs + 1):
            for case in CASES:
                # The trees' order alternates from slot to slot, against the drift of a shared host.
                for tree in trees if slot % 2 == 0 else trees[::-1]:
                    template, loaded = templates[tree.name]
                    result = measure(admin_url, tree, template, case, number, plan, args.writers)
                    measured.append(result)
                    say(describe(result, loaded))
                slot += 1
    finally:
        for name, _ in templates.values():
            run_module.drop_database(admin_url, name)

    caption = f"medians of {runs} run(s): prune of {events:,} applied events under {args.writers} writers"
    rows = summary_rows(measured, trees)
    table = Table(*COLUMNS, title=caption, title_justify="left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    took = (dt.datetime.now(dt.UTC) - started).total_seconds()
    say(f"load average at the end {[round(load, 2) for load in os.getloadavg()]}; took {took:.0f} s")
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{started.strftime('%Y-%m-%dT%H%M')}-retention.md"
    path.write_text(markdown(lines, caption, rows))
    console.print(f"written {path}", markup=False, highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
