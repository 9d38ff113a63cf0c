"""Drain rate of two source trees, interleaved: what writing job transitions (migration 0012) costs the drain.

    git worktree add /tmp/bench_head HEAD          # the tree to compare against
    python bench/transition_drain.py [--trees current=.,head=/tmp/bench_head] [--configs 1:1,4:4]
                                     [--events 200000] [--runs 5]

For each tree and partition count P: a template database built by that tree's own code (its
migrations, bench/scale.py's build_template: P partitions, --events events through the capture
trigger, 10 variants per job, then VACUUM ANALYZE). Then, per run, every (config, tree) in turn
(A B A B ...: the trees alternate within each config, and which goes first alternates from run to
run): a fresh copy of the tree's template, W `python -m processor.cli run` processes of that tree
(cwd and PYTHONPATH the tree, so that its modules come before the editable install), timed as
bench/scale.py times them (its Timeline and checks: every job folded, every event applied once).
A config P:W is P partitions drained by W workers.

Figures: events/s from the processes' start, and from the moment every partition had a worker;
medians per (config, tree), and the median of the per-run ratios (tree / first tree). Scratch
databases on the server of OUTBOX_BENCH_DATABASE_URL (or OUTBOX_TEST_DATABASE_URL), else the
embedded server. bench/README.md ("Job transitions (migration 0012)") describes it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import run as run_module  # noqa: E402
import scale  # noqa: E402
from psycopg import sql  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from processor import store  # noqa: E402
from processor.database import DatabaseUrl, connect  # noqa: E402

RESULTS = HERE / "results"
TAG = os.getpid()

# Run in the tree: its bench/scale.py builds the template with its own migrations.
BUILD = """
import json, sys
sys.path.insert(0, "bench")
import run, scale
name, written, spread = scale.build_template(run.server(), events={events}, partitions={partitions})
print(json.dumps([name, written, spread]))
"""


def tree_env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tree)
    return env


def git_state(tree: Path) -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=tree, capture_output=True, text=True)
    changed = len([line for line in dirty.stdout.splitlines() if not line[3:].startswith("bench/")])
    return f"{head.stdout.strip()}" + (f" + {changed} uncommitted files" if changed else "")


def build(admin_url: DatabaseUrl, tree_name: str, tree: Path, *, events: int, partitions: int) -> tuple[str, int]:
    """The tree's template for ``partitions``, renamed for this run; its name and event count."""
    done = subprocess.run(
        [sys.executable, "-c", BUILD.format(events=events, partitions=partitions)],
        cwd=tree,
        env=tree_env(tree),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the template in {tree} failed: {done.stderr[-2000:]}")
    name, written, _ = json.loads(done.stdout.strip().splitlines()[-1])
    target = f"outbox_bench_tdrain_{tree_name}_{partitions}_{TAG}"
    run_module.drop_database(admin_url, target)
    with connect(admin_url, application_name="outbox-bench") as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(name), sql.Identifier(target)))
    return target, int(written)


class TreeWorkers(scale.Workers):
    """bench/scale.py's Workers, running the processor of ``tree``."""

    def __init__(self, db: DatabaseUrl, count: int, partitions: int, tree: Path) -> None:
        env = {
            **{k: v for k, v in tree_env(tree).items() if not k.startswith("OUTBOX_")},
            "OUTBOX_DATABASE_URL": db.url.render_as_string(hide_password=False),
            "OUTBOX_PIPELINE_STEPS": ",".join(scale.steps()),
            "OUTBOX_PARTITIONS": str(partitions),
            "OUTBOX_STANDBY_INTERVAL": str(scale.STANDBY_INTERVAL),
            "OUTBOX_LOG_LEVEL": "WARNING",
        }
        self.logs = [tempfile.TemporaryFile() for _ in range(count)]  # noqa: SIM115 - closed in stop()
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "processor.cli", "run"], cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT
            )
            for log in self.logs
        ]
        self.outputs = []


# Workers' backends waiting for an advisory lock in a statement: the transitions lock (migration
# 0012; the partitions' consumer locks are only tried, never waited for).
WAITING_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock' AND wait_event = 'advisory'
"""
BACKENDS_SQL = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE 'outbox-%%' AND pid <> pg_backend_pid()
"""


def cpu_seconds(conn: Any, group: scale.Workers) -> tuple[float | None, float | None]:
    """CPU (user + system) so far of the workers' server backends, and of the worker processes (Linux /proc).

    Unlike wall time, CPU time barely depends on what else the shared machine runs.
    """
    backends = [int(row[0]) for row in conn.execute(BACKENDS_SQL)]
    server = run_module.backend_cpu_seconds(backends)
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        for process in group.processes:
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    except OSError:
        return server, None
    return server, total / ticks


def applied(conn: Any) -> int:
    row = conn.execute(scale.PROGRESS_SQL).fetchone()
    return int(row[0]) if row else 0


def _per_event(
    start: tuple[tuple[float | None, float | None], int] | None,
    end: tuple[tuple[float | None, float | None], int],
    side: int,
) -> float | None:
    """CPU µs per event applied between the moment every partition was owned and the end."""
    if start is None or start[0][side] is None or end[0][side] is None or end[1] <= start[1]:
        return None
    return round((end[0][side] - start[0][side]) / (end[1] - start[1]) * 1e6, 2)  # type: ignore[operator]


def drain(
    admin_url: DatabaseUrl, template: str, tree: Path, *, events: int, workers: int, partitions: int
) -> dict[str, Any]:
    """One drain of a copy of ``template`` by ``workers`` processes of ``tree`` (as bench/scale.py's drain)."""
    name = f"outbox_bench_tdrain_{TAG}"
    db = run_module.fresh_database(admin_url, name, template=template)
    try:
        with connect(db, application_name="outbox-bench") as conn:
            pending = store.work_pending(conn)
            if pending != events:
                raise RuntimeError(f"the copy has {pending} events pending, expected {events}")
            timeline = scale.Timeline(conn, events=events, workers=workers, partitions=partitions)
            group = TreeWorkers(db, workers, partitions, tree)
            try:
                at_owned: tuple[tuple[float | None, float | None], int] | None = None
                samples = waiting = 0
                while True:
                    group.check()
                    finished = timeline.poll()
                    samples += 1
                    waiting += int(conn.execute(WAITING_SQL).fetchone()[0] > 0)  # type: ignore[index]
                    if at_owned is None and (timeline.owned is not None or finished):
                        # Start-up (imports, connections, checks) is over: CPU from here on is the drain's.
                        at_owned = (cpu_seconds(conn, group), applied(conn))
                    if finished:
                        break
                    if time.perf_counter() - timeline.started > scale.TIMEOUT_SECONDS:
                        raise RuntimeError(f"the workers did not drain {events:,} events")
                    time.sleep(scale.POLL_SECONDS)  # polling other processes' progress
                at_done = (cpu_seconds(conn, group), applied(conn))  # before the checks: they cost CPU too
                check = scale._check(conn, events)
                transitions = conn.execute(
                    "SELECT count(*) FROM pg_class WHERE relname = 'outbox_job_transitions'"
                ).fetchone()
                if transitions and transitions[0]:
                    written = conn.execute("SELECT count(*) FROM outbox_job_transitions").fetchone()
                    check["transitions"] = int(written[0]) if written else 0
            finally:
                codes = group.stop()
        processed = [scale._processed(output) for output in group.outputs]
        if any(codes) or sum(processed) != events:
            raise RuntimeError(f"workers exited with {codes}, processed {processed} events of {events}")
    finally:
        run_module.drop_database(admin_url, name)
    done = timeline.done
    assert done is not None
    owned = timeline.owned if timeline.owned is not None else done
    return {
        "seconds": round(done, 3),
        "events_per_second": round(events / done, 1),
        "all_partitions_owned_seconds": round(owned, 3),
        "events_per_second_after_owned": round(events / (done - owned), 1) if done > owned else None,
        "events_per_worker": sorted(processed, reverse=True),
        "polls": samples,
        "polls_with_a_worker_waiting_for_an_advisory_lock": waiting,
        "events_after_owned": at_done[1] - (at_owned[1] if at_owned is not None else 0),
        "server_cpu_us_per_event": _per_event(at_owned, at_done, 0),
        "worker_cpu_us_per_event": _per_event(at_owned, at_done, 1),
        "check": check,
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--trees", default=f"current={ROOT},head=/tmp/bench_head", help="NAME=PATH pairs; ratios are over the first"
    )
    parser.add_argument("--configs", default="1:1,4:4", help="PARTITIONS:WORKERS pairs, comma-separated")
    parser.add_argument("--events", type=int, default=200_000, help="backlog size (a multiple of 20)")
    parser.add_argument("--runs", type=int, default=5, help="drains per (config, tree)")
    args = parser.parse_args(argv)
    trees = [(pair.split("=", 1)[0], Path(pair.split("=", 1)[1]).resolve()) for pair in args.trees.split(",")]
    configs = [(int(c.split(":")[0]), int(c.split(":")[1])) for c in args.configs.split(",")]
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    admin_url = run_module.server()
    machine = run_module.machine(admin_url)
    import transition_latency

    machine["cpu"] = transition_latency.cpu_model()
    machine["trees"] = {name: f"{path}: {git_state(path)}" for name, path in trees}
    command = shlex.join(
        [Path(sys.executable).name, "bench/transition_drain.py", *(sys.argv[1:] if argv is None else argv)]
    )
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    templates: dict[tuple[str, int], tuple[str, int]] = {}
    measured: list[dict[str, Any]] = []
    try:
        for partitions in sorted({p for p, _ in configs}):
            for name, path in trees:
                started = time.perf_counter()
                templates[(name, partitions)] = build(admin_url, name, path, events=args.events, partitions=partitions)
                console.print(
                    f"template {name}, {partitions} partition(s): {templates[(name, partitions)][1]:,} events, "
                    f"built in {time.perf_counter() - started:.1f} s"
                )
        for number in range(args.runs):
            for partitions, workers in configs:
                order = trees if number % 2 == 0 else trees[::-1]
                for name, path in order:
                    template, events = templates[(name, partitions)]
                    result = drain(admin_url, template, path, events=events, workers=workers, partitions=partitions)
                    result.update(run=number + 1, tree=name, partitions=partitions, workers=workers)
                    measured.append(result)
                    console.print(
                        f"run {number + 1}, {partitions} partition(s) / {workers} worker(s), {name}: "
                        f"{result['seconds']:.2f} s, {result['events_per_second']:,.0f} events/s from the start, "
                        f"{result['events_per_second_after_owned'] or 0:,.0f} events/s once every partition was "
                        f"owned (after {result['all_partitions_owned_seconds']} s); events per worker "
                        f"{result['events_per_worker']}; CPU per event once owned: server "
                        f"{result['server_cpu_us_per_event']} us, workers {result['worker_cpu_us_per_event']} us "
                        f"({result['events_after_owned']:,} events); "
                        f"transitions {result['check'].get('transitions', '-')}; a worker waited for the "
                        f"transitions lock in {result['polls_with_a_worker_waiting_for_an_advisory_lock']} of "
                        f"{result['polls']} polls; "
                        f"load {result['load_average']}"
                    )
    finally:
        for template, _ in templates.values():
            run_module.drop_database(admin_url, template)
    figures: dict[str, Any] = {}
    base = trees[0][0]
    table = Table(
        "partitions / workers",
        "tree",
        "events/s from start (median)",
        "events/s after owned (median)",
        f"ratio to {base} (median of per-run ratios): from start / after owned",
        "CPU us per event once owned: server / workers (median)",
        "events/s per run (from start)",
        title=f"drain of {args.events:,} events, {args.runs} runs per tree, interleaved",
        title_justify="left",
    )
    for partitions, workers in configs:
        for name, _ in trees:
            mine = [r for r in measured if (r["tree"], r["partitions"], r["workers"]) == (name, partitions, workers)]
            theirs = {
                r["run"]: r
                for r in measured
                if (r["tree"], r["partitions"], r["workers"]) == (base, partitions, workers)
            }
            key = f"{partitions}p_{workers}w_{name}"
            figures[f"drain_events_per_second_{key}"] = round(statistics.median(r["events_per_second"] for r in mine))
            after = [r["events_per_second_after_owned"] for r in mine if r["events_per_second_after_owned"]]
            figures[f"drain_events_per_second_after_owned_{key}"] = round(statistics.median(after)) if after else None
            ratios = [r["events_per_second"] / theirs[r["run"]]["events_per_second"] for r in mine]
            ratios_after = [
                r["events_per_second_after_owned"] / theirs[r["run"]]["events_per_second_after_owned"]
                for r in mine
                if r["events_per_second_after_owned"] and theirs[r["run"]]["events_per_second_after_owned"]
            ]
            for side in ("server", "worker"):
                cpu = [r[f"{side}_cpu_us_per_event"] for r in mine if r[f"{side}_cpu_us_per_event"] is not None]
                figures[f"drain_{side}_cpu_us_per_event_{key}"] = round(statistics.median(cpu), 2) if cpu else None
            figures[f"drain_ratio_{key}_over_{base}"] = round(statistics.median(ratios), 3)
            figures[f"drain_ratio_after_owned_{key}_over_{base}"] = (
                round(statistics.median(ratios_after), 3) if ratios_after else None
            )
            table.add_row(
                f"{partitions} / {workers}",
                name,
                f"{figures[f'drain_events_per_second_{key}']:,}",
                f"{figures[f'drain_events_per_second_after_owned_{key}'] or 0:,}",
                f"{figures[f'drain_ratio_{key}_over_{base}']} / "
                f"{figures[f'drain_ratio_after_owned_{key}_over_{base}']}",
                f"{figures[f'drain_server_cpu_us_per_event_{key}']} / "
                f"{figures[f'drain_worker_cpu_us_per_event_{key}']}",
                ", ".join(f"{r['events_per_second']:,.0f}" for r in mine),
            )
    machine["load_average_at_end"] = [round(load, 2) for load in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    document = {
        "command": command,
        "started_at": started_at,
        "machine": machine,
        "options": vars(args),
        "figures": figures,
        "runs": measured,
    }
    (RESULTS / "transition_drain.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    console.print(table)
    console.print(
        f"machine: {machine['cores']} cores ({machine['cpu']}), PostgreSQL {machine['postgresql']}, Python "
        f"{machine['python']}, psycopg {machine['psycopg']}; load average {machine['load_average_at_start']} at "
        f"start, {machine['load_average_at_end']} at end"
    )
    for name, state in machine["trees"].items():
        console.print(f"tree {name}: {state}")
    console.print(f"command: {command}")
    console.print(f"written {RESULTS / 'transition_drain.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
