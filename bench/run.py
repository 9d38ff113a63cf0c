"""Benchmarks: drain rate and writer overhead, with the machine they ran on.

    python3 dev.py bench [--sizes 10000,100000,200000] [--runs 3]

Prints a table and writes bench/results/latest.json and latest.md. The database: a scratch
database created on the server of OUTBOX_BENCH_DATABASE_URL (or OUTBOX_TEST_DATABASE_URL), else
the embedded server. Benchmarks print figures; tests never assert timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

import outbox
from processor.database import DatabaseUrl, connect
from processor.migrate import migrate
from processor.settings import load_settings
from processor.worker import Worker

STEPS = "ingest,detect,segment,iou_eval"
RESULTS = Path(__file__).parent / "results"
BACKLOG_SQL = """
INSERT INTO jobs (job_id, status) SELECT gen_random_uuid(), 'queued' FROM generate_series(1, %(jobs)s);
INSERT INTO jobs_variants (job_variants_id, job_id, status)
    SELECT gen_random_uuid(), job_id, 'queued' FROM jobs, generate_series(1, 10);
"""


def server() -> DatabaseUrl:
    raw = os.environ.get("OUTBOX_BENCH_DATABASE_URL") or os.environ.get("OUTBOX_TEST_DATABASE_URL")
    if raw:
        return DatabaseUrl.parse(raw)
    from processor.embedded import embedded_database_url

    return DatabaseUrl.parse(embedded_database_url())


def fresh_database(admin_url: DatabaseUrl, name: str) -> DatabaseUrl:
    with connect(admin_url, application_name="outbox-bench") as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    db = DatabaseUrl(admin_url.url.set(database=name))
    with connect(db, application_name="outbox-bench") as conn:
        migrate(conn)
    return db


def drain_rate(admin_url: DatabaseUrl, events: int) -> float:
    """Events/s applied by one worker from a backlog of ``events`` (inserts then updates, 10 per job)."""
    db = fresh_database(admin_url, "outbox_bench_drain")
    jobs = max(1, events // 20)
    with connect(db, application_name="outbox-bench") as conn:
        conn.execute(BACKLOG_SQL.replace("%(jobs)s", str(jobs)).encode())
        conn.execute("UPDATE jobs_variants SET status = 'running', current_step = 'ingest'")
        total = conn.execute("SELECT count(*) FROM outbox_events").fetchone()[0]  # type: ignore[index]
        conn.execute("VACUUM ANALYZE")
    settings = load_settings(database_url=db.url.render_as_string(hide_password=False), pipeline_steps=STEPS)
    started = time.perf_counter()
    stats = Worker(settings, db).run(until_idle=True)
    seconds = time.perf_counter() - started
    assert stats.events == total, (stats.events, total)
    return total / seconds


def writer_rate(db: DatabaseUrl, mode: str, seconds: float = 5.0, writers: int = 4) -> float:
    """Single-variant update transactions per second from ``writers`` connections."""
    with connect(db, application_name="outbox-bench") as conn:
        variants = [row[0] for row in conn.execute("SELECT job_variants_id FROM jobs_variants")]
        trigger_state = "DISABLE" if mode == "no capture" else "ENABLE"
        conn.execute(f"ALTER TABLE jobs_variants {trigger_state} TRIGGER USER")
    counts = [0] * writers
    stop = threading.Event()

    def write(index: int) -> None:
        rng = random.Random(index)
        with connect(db, application_name="outbox-bench-writer", autocommit=True) as conn:
            while not stop.is_set():
                status, step = rng.choice(["running", "done"]), rng.choice(STEPS.split(","))
                variant = rng.choice(variants)
                if mode == "python api":
                    # autocommit, like the plain UPDATE: one statement, one transaction
                    outbox.update_variant(conn, variant, status=status, step=step)
                else:
                    conn.execute(
                        "UPDATE jobs_variants SET status = %s, current_step = %s WHERE job_variants_id = %s",
                        [status, step, variant],
                    )
                counts[index] += 1

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)  # the measurement window, not synchronisation
    stop.set()
    for thread in threads:
        thread.join()
    with connect(db, application_name="outbox-bench") as conn:
        conn.execute("ALTER TABLE jobs_variants ENABLE TRIGGER USER")
    return sum(counts) / seconds


def machine(admin_url: DatabaseUrl) -> dict[str, Any]:
    with connect(admin_url, application_name="outbox-bench") as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    return {
        "cores": os.cpu_count(),
        "postgresql": version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "psycopg": psycopg.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,200000", help="backlog sizes for the drain rate")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (the median is reported)")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    console = Console()
    admin_url = server()
    results: dict[str, Any] = {"machine": machine(admin_url), "command": "python3 dev.py bench " + args.sizes}
    for size in sizes:
        runs = [drain_rate(admin_url, size) for _ in range(args.runs)]
        results[f"drain_events_per_second_{size}"] = round(statistics.median(runs))
        console.print(f"drain {size:,}: {[round(r) for r in runs]} events/s")
    db = fresh_database(admin_url, "outbox_bench_writers")
    with connect(db, application_name="outbox-bench") as conn:
        conn.execute(BACKLOG_SQL.replace("%(jobs)s", "1000").encode())
    for mode in ("no capture", "trigger", "python api"):
        runs = [writer_rate(db, mode) for _ in range(args.runs)]
        results[f"writer_tx_per_second_{mode.replace(' ', '_')}"] = round(statistics.median(runs))
        console.print(f"writers, {mode}: {[round(r) for r in runs]} tx/s")
    base = results["writer_tx_per_second_no_capture"]
    results["writer_overhead_ratio_trigger"] = round(results["writer_tx_per_second_trigger"] / base, 3)
    results["writer_overhead_ratio_python_api"] = round(results["writer_tx_per_second_python_api"] / base, 3)

    table = Table("figure", "value", title="outbox benchmarks (median of runs)", title_justify="left")
    for key, value in results.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else f"{value}")
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| figure | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in results.items()]
    (RESULTS / "latest.md").write_text("\n".join(lines) + "\n")
    console.print(f"written {RESULTS / 'latest.json'} and latest.md")


if __name__ == "__main__":
    main()
