"""Drain rate with 1, 2 and 4 `outbox run` processes sharing the partitions (partitioned scale-out).

    python bench/scale.py [--workers 1,2,4] [--events 200000] [--partitions 8] [--runs 3] [--json]

For each run and worker count W: a scratch database, a copy of a template built once (migrated,
repartitioned to --partitions while empty, then a backlog of --events events written through the
capture trigger, then VACUUM ANALYZE); W `outbox run` processes started together; the time from
their start until every event is applied and every job folded (store.work_pending == 0), and until
every partition has a worker. Rates: events / seconds, from the start of the processes and from the
moment every partition was owned. The result is checked (every job folded to the state its
variants give, every event applied once) before the workers are stopped with SIGTERM.

Scratch databases on the server of OUTBOX_BENCH_DATABASE_URL (or OUTBOX_TEST_DATABASE_URL), else
the embedded server; figures are medians of --runs runs. Prints a table, writes
bench/results/scale.json. bench/README.md ("Scale-out") describes the method. Benchmarks print
figures; tests never assert timings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from processor import store
from processor.database import DatabaseUrl, connect
from processor.repartition import repartition

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATABASE = "outbox_bench_scale"
EVENTS_PER_JOB = 20  # 10 variants per job, one insert and one update event each
POLL_SECONDS = 0.05  # how often the bench looks at the workers' progress
STANDBY_INTERVAL = 0.2  # OUTBOX_STANDBY_INTERVAL: how often a worker rebalances its share
TIMEOUT_SECONDS = 1800.0  # one drain, before the bench gives up

# The backlog, written through the capture trigger as writers would: the jobs and 10 queued
# variants per job (one variant_changed event each, in one transaction), then every variant moved
# to running at the first step (one more event each, in a second transaction). Each job hashes to
# a partition, so both transactions spread over every partition.
MOVE_SQL = "UPDATE jobs_variants SET status = 'running', current_step = %(step)s"
# What the fold must give: every job running at the first step.
CHECK_SQL = """
SELECT (SELECT count(*) FROM jobs),
       (SELECT count(*) FROM jobs WHERE status = 'running' AND current_step = %(step)s),
       (SELECT count(*) FROM outbox_events),
       (SELECT coalesce(sum(events_applied), 0) FROM outbox_checkpoints),
       (SELECT count(*) FROM outbox_dead_letters),
       (SELECT count(*) FROM outbox_job_flags)
"""
# The bench's cheap look at progress: events applied so far, and whether a catch-up is in progress
# or jobs wait to be folded.
PROGRESS_SQL = """
SELECT (SELECT coalesce(sum(events_applied), 0) FROM outbox_checkpoints),
       (SELECT bool_or(target_snapshot IS NOT NULL) FROM outbox_checkpoints)
       OR EXISTS (SELECT 1 FROM outbox_dirty_jobs)
"""
PROCESSED = re.compile(r"processed (\d+) events in (\d+) batches")


def _run_module() -> ModuleType:
    """bench/run.py, imported when first needed (so that run.py may import this module)."""
    try:
        return importlib.import_module("run")
    except ModuleNotFoundError:
        return importlib.import_module("bench.run")


def steps() -> list[str]:
    return str(_run_module().STEPS).split(",")


def build_template(admin_url: DatabaseUrl, *, events: int, partitions: int) -> tuple[str, int, list[int]]:
    """The backlog database every drain copies: its name, its event count, the events per partition."""
    run = _run_module()
    name = f"{DATABASE}_backlog_{events}_{partitions}"
    db = run.fresh_database(admin_url, name)
    jobs = max(1, events // EVENTS_PER_JOB)
    try:
        with connect(db, application_name="outbox-bench") as conn:
            report = repartition(conn, partitions)  # on an empty database: no wait
            assert store.partitions_get(conn) == partitions, report
            conn.execute(run.BACKLOG_SQL.replace("%(jobs)s", str(jobs)).encode())
            conn.execute(MOVE_SQL, {"step": steps()[0]})
            conn.execute("VACUUM ANALYZE")
            written = int(conn.execute("SELECT count(*) FROM outbox_events").fetchone()[0])  # type: ignore[index]
            spread = conn.execute("SELECT partition, count(*) FROM outbox_events GROUP BY 1 ORDER BY 1").fetchall()
        if written != jobs * EVENTS_PER_JOB or len(spread) != min(partitions, jobs):
            raise RuntimeError(f"unexpected backlog: {written} events over partitions {spread}")
    except BaseException:
        run.drop_database(admin_url, name)
        raise
    return name, written, [int(count) for _, count in spread]


class Workers:
    """``count`` `outbox run` processes on ``db``, started together, output kept in temporary files."""

    def __init__(self, db: DatabaseUrl, count: int, partitions: int) -> None:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")},
            "OUTBOX_DATABASE_URL": db.url.render_as_string(hide_password=False),
            "OUTBOX_PIPELINE_STEPS": ",".join(steps()),
            "OUTBOX_PARTITIONS": str(partitions),
            "OUTBOX_STANDBY_INTERVAL": str(STANDBY_INTERVAL),
            "OUTBOX_LOG_LEVEL": "WARNING",
        }
        self.logs = [tempfile.TemporaryFile() for _ in range(count)]  # noqa: SIM115 - closed in stop()
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "processor.cli", "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
            for log in self.logs
        ]
        self.outputs: list[str] = []

    def check(self) -> None:
        for process, log in zip(self.processes, self.logs, strict=True):
            if process.poll() is not None:
                raise RuntimeError(f"`outbox run` exited with {process.returncode}:\n{_read(log)[-2000:]}")

    def stop(self) -> list[int]:
        """SIGTERM to all (each finishes its batch in hand and exits 0); their exit codes."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = []
        for process in self.processes:
            try:
                codes.append(process.wait(timeout=30))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(process.wait())
        self.outputs = [_read(log) for log in self.logs]
        for log in self.logs:
            log.close()
        return codes


def _read(log: Any) -> str:
    log.seek(0)
    return str(log.read().decode(errors="replace"))


class Timeline:
    """What the bench sees of the workers, polled every POLL_SECONDS: who owns which partition, and progress.

    store.work_pending is exact but reads every pending event (about 35-100 ms per call at 20k
    pending events on the shared 2-core machine, ten times that at 200k): called every 50 ms it
    would take a core from the workers. So every poll reads the checkpoints' applied-event counts
    (8 rows), and work_pending is called to confirm once they say the backlog is applied and folded,
    and every FULL_POLL_SECONDS anyway, in case they never do.
    """

    FULL_POLL_SECONDS = 5.0

    def __init__(self, conn: psycopg.Connection[Any], *, events: int, workers: int, partitions: int) -> None:
        self.conn = conn
        self.events = events
        self.workers = workers
        self.partitions = partitions
        self.applied_before = self._progress()[0]
        self.started = time.perf_counter()
        self.last_full = self.started
        self.first_owned: float | None = None  # some worker holds a partition: start-up is over
        self.owned: float | None = None  # every partition has a worker
        self.balanced: float | None = None  # and each worker holds at most its fair share
        self.done: float | None = None
        self.polls: list[float] = []
        self.full_polls: list[float] = []

    def _progress(self) -> tuple[int, bool]:
        row = self.conn.execute(PROGRESS_SQL).fetchone()
        assert row is not None
        return int(row[0]), bool(row[1])

    def poll(self) -> bool:
        """One look; True once no work is pending (work_pending == 0)."""
        polled = time.perf_counter()
        now = polled - self.started
        holders = store.consumer_lock_holders(self.conn)
        per_worker: dict[str, int] = {}
        for holder in holders.values():
            per_worker[holder.application_name] = per_worker.get(holder.application_name, 0) + 1
        if holders and self.first_owned is None:
            self.first_owned = now
        if len(holders) == self.partitions:
            self.owned = now if self.owned is None else self.owned
            share = -(-self.partitions // self.workers)
            fair = len(per_worker) == min(self.workers, self.partitions) and max(per_worker.values()) <= share
            self.balanced = now if self.balanced is None and fair else self.balanced
        applied, busy = self._progress()
        self.polls.append(time.perf_counter() - polled)
        if (
            applied - self.applied_before >= self.events and not busy
        ) or polled - self.last_full >= self.FULL_POLL_SECONDS:
            full = time.perf_counter()
            pending = store.work_pending(self.conn)
            self.last_full = time.perf_counter()
            self.full_polls.append(self.last_full - full)
            if pending == 0:
                self.done = self.last_full - self.started  # the end of the poll that saw it: nothing subtracted
                return True
        return False


def drain(admin_url: DatabaseUrl, template: str, *, events: int, workers: int, partitions: int) -> dict[str, Any]:
    """One drain of a copy of ``template`` by ``workers`` processes: timings and checks."""
    run = _run_module()
    db = run.fresh_database(admin_url, DATABASE, template=template)
    try:
        with connect(db, application_name="outbox-bench") as conn:
            pending_before = store.work_pending(conn)
            if pending_before != events:
                raise RuntimeError(f"the copy has {pending_before} events pending, expected {events}")
            timeline = Timeline(conn, events=events, workers=workers, partitions=partitions)
            group = Workers(db, workers, partitions)
            try:
                while True:
                    group.check()
                    if timeline.poll():
                        break
                    if time.perf_counter() - timeline.started > TIMEOUT_SECONDS:
                        raise RuntimeError(f"the workers did not drain {events:,} events in {TIMEOUT_SECONDS:.0f} s")
                    time.sleep(POLL_SECONDS)  # polling other processes' progress, not synchronisation
                check = _check(conn, events)
            finally:
                codes = group.stop()
        processed = [_processed(output) for output in group.outputs]
        if any(codes) or sum(processed) != events:
            raise RuntimeError(
                f"workers exited with {codes}, processed {processed} events of {events}:\n"
                + "\n".join(output[-1000:] for output in group.outputs)
            )
        warnings = [line for output in group.outputs for line in output.splitlines() if "processed" not in line]
    finally:
        run.drop_database(admin_url, DATABASE)
    done = timeline.done
    assert done is not None
    owned = timeline.owned if timeline.owned is not None else done
    return {
        "workers": workers,
        "events": events,
        "seconds": round(done, 3),
        "events_per_second": round(events / done, 1),
        "first_partition_owned_seconds": _round(timeline.first_owned),
        "all_partitions_owned_seconds": round(owned, 3),
        "balanced_seconds": _round(timeline.balanced),
        "events_per_second_after_owned": round(events / (done - owned), 1) if done > owned else None,
        "events_per_worker": sorted(processed, reverse=True),
        "poll_ms_median": round(statistics.median(timeline.polls) * 1000, 1),
        "work_pending_ms_median": round(statistics.median(timeline.full_polls) * 1000, 1),
        "polls": len(timeline.polls),
        "work_pending_calls": len(timeline.full_polls),
        "worker_output": warnings[:20],
        "check": check,
    }


def _round(seconds: float | None) -> float | None:
    return round(seconds, 3) if seconds is not None else None


def _check(conn: psycopg.Connection[Any], events: int) -> dict[str, int]:
    """Every job folded to running at the first step, every event applied once, nothing left aside."""
    row = conn.execute(CHECK_SQL, {"step": steps()[0]}).fetchone()
    assert row is not None
    jobs, right, written, applied, dead, flagged = (int(value) for value in row)
    check = {
        "jobs": jobs,
        "jobs_in_folded_state": right,
        "events": written,
        "events_applied": applied,
        "dead_letters": dead,
        "flagged_jobs": flagged,
        "work_pending": store.work_pending(conn),
    }
    if right != jobs or jobs * EVENTS_PER_JOB != events or written != events or applied != events:
        raise RuntimeError(f"wrong result after the drain: {check}")
    if dead or flagged or check["work_pending"]:
        raise RuntimeError(f"wrong result after the drain: {check}")
    return check


def _processed(output: str) -> int:
    match = PROCESSED.search(output)
    return int(match.group(1)) if match else -1


def measure(
    admin_url: DatabaseUrl,
    *,
    runs: int,
    events: int = 200_000,
    partitions: int = 8,
    workers: Sequence[int] = (1, 2, 4),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Drain rates per worker count, medians over ``runs``, as flat keys (for bench/run.py)."""
    return _measure(admin_url, runs=runs, events=events, partitions=partitions, workers=workers, log=log)[0]


def _measure(
    admin_url: DatabaseUrl,
    *,
    runs: int,
    events: int,
    partitions: int,
    workers: Sequence[int],
    log: Callable[[str], None],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run_module = _run_module()
    started = time.perf_counter()
    template, written, spread = build_template(admin_url, events=events, partitions=partitions)
    log(
        f"backlog of {written:,} events over {partitions} partitions ({min(spread):,} to {max(spread):,} each) "
        f"built in {time.perf_counter() - started:.1f} s"
    )
    measured: list[dict[str, Any]] = []
    try:
        for number in range(runs):
            # The order rotates from run to run, so that a drift of a shared machine falls on all counts alike.
            order = list(workers[number % len(workers) :]) + list(workers[: number % len(workers)])
            for count in order:
                result = drain(admin_url, template, events=written, workers=count, partitions=partitions)
                result["run"] = number + 1
                result["events_per_partition"] = spread
                result["load_average"] = [round(load, 2) for load in os.getloadavg()]
                measured.append(result)
                log(
                    f"run {number + 1}, {count} worker{'s' if count > 1 else ''}: {result['seconds']:.2f} s, "
                    f"{result['events_per_second']:,.0f} events/s from the start; partitions owned: the first "
                    f"after {result['first_partition_owned_seconds']} s, all after "
                    f"{result['all_partitions_owned_seconds']} s, balanced after {result['balanced_seconds']} s; "
                    f"{result['events_per_second_after_owned'] or 0:,.0f} events/s from then; "
                    f"events per worker {result['events_per_worker']}"
                )
    finally:
        run_module.drop_database(admin_url, template)
    return figures(measured, workers), measured


def figures(measured: Sequence[dict[str, Any]], workers: Sequence[int]) -> dict[str, Any]:
    """Medians per worker count; the speed-up over one worker is the median of per-run ratios."""
    out: dict[str, Any] = {}
    for count in workers:
        results = [r for r in measured if r["workers"] == count]
        suffix = f"{count}_workers"
        out[f"scale_drain_events_per_second_{suffix}"] = round(
            statistics.median(r["events_per_second"] for r in results)
        )
        after = [r["events_per_second_after_owned"] for r in results if r["events_per_second_after_owned"]]
        out[f"scale_drain_events_per_second_after_owned_{suffix}"] = round(statistics.median(after)) if after else None
        out[f"scale_drain_seconds_{suffix}"] = round(statistics.median(r["seconds"] for r in results), 2)
        out[f"scale_first_partition_owned_seconds_{suffix}"] = round(
            statistics.median(r["first_partition_owned_seconds"] or r["seconds"] for r in results), 2
        )
        out[f"scale_all_partitions_owned_seconds_{suffix}"] = round(
            statistics.median(r["all_partitions_owned_seconds"] for r in results), 2
        )
        balanced = [r["balanced_seconds"] for r in results if r["balanced_seconds"] is not None]
        out[f"scale_balanced_seconds_{suffix}"] = round(statistics.median(balanced), 2) if balanced else None
    if 1 in workers:
        base = {r["run"]: r for r in measured if r["workers"] == 1}
        for count in workers:
            if count == 1:
                continue
            ratios = [
                r["events_per_second"] / base[r["run"]]["events_per_second"] for r in measured if r["workers"] == count
            ]
            out[f"scale_speedup_{count}_workers_over_1"] = round(statistics.median(ratios), 2)
    return out


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4", help="worker process counts, comma-separated")
    parser.add_argument("--events", type=int, default=200_000, help="backlog size (a multiple of 20: 10 variants/job)")
    parser.add_argument("--partitions", type=int, default=8, help="partition count (outbox repartition N)")
    parser.add_argument("--runs", type=int, default=3, help="runs per worker count (the median is reported)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if not workers or min(workers) < 1 or args.events < EVENTS_PER_JOB or args.runs < 1:
        parser.error("--workers must be positive counts, --events at least 20, --runs at least 1")
    console = Console(stderr=args.json)
    if not console.is_terminal:
        console = Console(stderr=args.json, width=160)  # a log file: no wrapping of the table
    run = _run_module()
    admin_url = run.server()
    command = shlex.join([sys.executable, "bench/scale.py", *(sys.argv[1:] if argv is None else argv)])
    machine = run.machine(admin_url)
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    found, measured = _measure(
        admin_url, runs=args.runs, events=args.events, partitions=args.partitions, workers=workers, log=console.print
    )
    machine["load_average_at_end"] = [round(load, 2) for load in os.getloadavg()]
    events = measured[0]["events"]
    RESULTS.mkdir(exist_ok=True)
    document = {
        "command": command,
        "started_at": started_at,
        "machine": machine,
        "options": {"workers": workers, "events": events, "partitions": args.partitions, "runs": args.runs},
        "figures": found,
        "runs": measured,
    }
    (RESULTS / "scale.json").write_text(json.dumps(document, indent=2) + "\n")
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    title = (
        f"drain of {events:,} events over {args.partitions} partitions by N `outbox run` processes "
        f"(medians of {args.runs} run{'s' if args.runs > 1 else ''})"
    )
    table = Table(
        "workers",
        "drain s",
        "events/s from start",
        "first partition owned s",
        "all partitions owned s",
        "balanced s",
        "events/s after owned",
        "speed-up over 1",
        "events/s per run",
        title=title,
        title_justify="left",
    )
    for count in workers:
        suffix = f"{count}_workers"
        per_run = ", ".join(f"{r['events_per_second']:,.0f}" for r in measured if r["workers"] == count)
        after = found[f"scale_drain_events_per_second_after_owned_{suffix}"]
        table.add_row(
            str(count),
            f"{found[f'scale_drain_seconds_{suffix}']:.2f}",
            f"{found[f'scale_drain_events_per_second_{suffix}']:,}",
            f"{found[f'scale_first_partition_owned_seconds_{suffix}']:.2f}",
            f"{found[f'scale_all_partitions_owned_seconds_{suffix}']:.2f}",
            _text(found[f"scale_balanced_seconds_{suffix}"]),
            f"{after:,}" if after is not None else "",
            str(found.get(f"scale_speedup_{count}_workers_over_1", "1.0" if count == 1 else "")),
            per_run,
        )
    console.print(table)
    console.print(
        f"machine: {machine['cores']} cores, PostgreSQL {machine['postgresql']}, Python {machine['python']}, "
        f"psycopg {machine['psycopg']} ({machine['platform']}; load average {machine['load_average_at_start']} "
        f"at start, {machine['load_average_at_end']} at end)"
    )
    console.print(f"command: {command}")
    console.print(f"written {RESULTS / 'scale.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
