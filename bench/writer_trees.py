"""Writer throughput of two source trees, interleaved: what a change to capture or the write API costs the writers.

    git worktree add /tmp/bench_head HEAD          # the tree to compare against
    python bench/writer_trees.py [--trees head=/tmp/bench_head,current=.] [--rounds 3] [--seconds 10]

The writer-overhead measurement of bench/run.py (its `writers` group: 4 writers, one variant per
transaction; no capture, the trigger path, the Python API path and the two floors, each for
--seconds per round in 5 interleaved slices), one round per tree in turn (A B, then B A, ...), each
in a child process of that tree (cwd and PYTHONPATH the tree, so that its modules and migrations
come before the editable install), on a scratch database the tree migrates itself. Ratios to no
capture are taken within a round of one tree, from the same stretch of time. The drain of two
trees is bench/transition_drain.py's; capture's server instructions, bench/capture_instructions.sh
run in each tree (deterministic: no interleaving needed).

Prints the machine, the trees, the command, every round and the medians per tree. Scratch databases
on the server of OUTBOX_BENCH_DATABASE_URL (or OUTBOX_TEST_DATABASE_URL), else the embedded server.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import run as run_module  # noqa: E402
import transition_latency  # noqa: E402

# Run in the tree: one round of its bench/run.py writer-overhead measurement, as JSON.
ROUND = """
import json, sys
sys.path.insert(0, "bench")
import run
measured = run.writer_overhead(run.server(), rounds=1, seconds=float(sys.argv[1]), slices=5, warmup=2.0,
                               say=lambda line: print(line, file=sys.stderr))
print(json.dumps(measured["rounds"][0]))
"""
SHOWN = ("trigger", "python_api")


def writers_round(path: Path, seconds: float) -> dict[str, dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(path)}
    done = subprocess.run(
        [sys.executable, "-c", ROUND, str(seconds)], cwd=path, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{path}: the writers round failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result: dict[str, dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def ratio(measured: dict[str, dict[str, Any]], mode: str) -> float:
    return float(measured[mode]["tx_per_second"]) / float(measured["none"]["tx_per_second"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--trees", default=f"head=/tmp/bench_head,current={ROOT}", help="NAME=PATH pairs, the reference first"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per tree")
    parser.add_argument("--seconds", type=float, default=10.0, help="per mode and round")
    args = parser.parse_args(argv)
    trees = [(pair.split("=", 1)[0], Path(pair.split("=", 1)[1]).resolve()) for pair in args.trees.split(",")]
    machine = run_module.machine(run_module.server())
    print(
        f"machine: {machine['cores']} cores ({transition_latency.cpu_model()}), PostgreSQL {machine['postgresql']}, "
        f"Python {machine['python']}, psycopg {machine['psycopg']}, load average {machine['load_average_at_start']}"
    )
    for name, path in trees:
        # The migrations themselves, not a migration's companion files (0015_segments.prepare.sql).
        migrations = len(
            [p for p in (path / "schema" / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql") if p.suffixes == [".sql"]]
        )
        print(f"tree {name}: {path} (migrations up to {migrations:04d})")
    print("command: " + shlex.join(["python", "bench/writer_trees.py", *(sys.argv[1:] if argv is None else argv)]))
    rounds: dict[str, list[dict[str, dict[str, Any]]]] = {name: [] for name, _ in trees}
    for number in range(args.rounds):
        for name, path in trees if number % 2 == 0 else trees[::-1]:
            measured = writers_round(path, args.seconds)
            rounds[name].append(measured)
            print(
                f"round {number + 1}, {name}: no capture {measured['none']['tx_per_second']:,.0f} tx/s; "
                + ", ".join(
                    f"{mode} {ratio(measured, mode):.3f} (server CPU {measured[mode]['server_cpu_us']} us/tx)"
                    for mode in SHOWN
                ),
                flush=True,
            )
    for mode in SHOWN:
        print(
            f"{mode} / no capture, medians of {args.rounds}: "
            + ", ".join(
                f"{name} {statistics.median(ratio(r, mode) for r in rounds[name]):.3f} (server CPU "
                f"{statistics.median(float(r[mode]['server_cpu_us'] or 0) for r in rounds[name]):.1f} us/tx)"
                for name, _ in trees
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
