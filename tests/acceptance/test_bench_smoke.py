"""bench/run.py as a subprocess: a quick drain and memory run writes parseable results.

No timing is asserted (benchmarks print figures; tests never assert timings): this only checks
that the benchmark runs end to end against the test server and writes what it promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from processor.database import DatabaseUrl

ROOT = Path(__file__).resolve().parents[2]


def run_quick_bench(server_url: DatabaseUrl, results: Path, *args: str) -> dict[str, Any]:
    """``bench/run.py --quick *args`` against the test server; its latest.json."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["OUTBOX_BENCH_DATABASE_URL"] = server_url.url.render_as_string(hide_password=False)
    done = subprocess.run(
        # --results: the test's own folder, so that bench/results/latest.* keep the last real run
        [sys.executable, "bench/run.py", "--quick", *args, "--results", str(results)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((results / "latest.json").read_text())


def run_quick_script(server_url: DatabaseUrl, script: str, output: Path) -> subprocess.CompletedProcess[str]:
    """``script --quick`` against the test server, its report written to ``output`` (so that
    bench/runs/ keeps real runs only); it must succeed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["OUTBOX_BENCH_DATABASE_URL"] = server_url.url.render_as_string(hide_password=False)
    done = subprocess.run(
        [sys.executable, script, "--quick", "--output", str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_quick_drain_and_memory_run_writes_results(server_url: DatabaseUrl, tmp_path: Path) -> None:
    data = run_quick_bench(server_url, tmp_path, "--only", "drain,memory")
    assert {"command", "machine", "figures", "options"} <= set(data)
    assert {"cores", "postgresql", "python", "psycopg"} <= set(data["machine"])
    assert "bench/run.py --quick --only drain,memory" in data["command"]
    figures = data["figures"]
    drain = figures["drain_events_per_second_20000"]
    assert drain["value"] > 0 and drain["unit"] == "events/s"
    for size in (2000, 20000):
        for batch in (1000, 10000):
            assert figures[f"worker_peak_rss_mb_{size}_batch_{batch}"]["value"] > 0
    assert figures["worker_baseline_rss_mb"]["value"] > 0
    assert "| figure | value | target |" in (tmp_path / "latest.md").read_text()


def test_quick_writers_run_measures_every_mode_and_the_floors(server_url: DatabaseUrl, tmp_path: Path) -> None:
    figures = run_quick_bench(server_url, tmp_path, "--only", "writers", "--writer-seconds", "1")["figures"]
    for mode in ("none", "trigger", "python_api", "floor_empty_trigger", "floor_bare_insert"):
        assert figures[f"writer_tx_per_second_{mode}"]["value"] > 0
    for mode in ("trigger", "python_api"):  # the product's paths are held to the target
        assert figures[f"writer_overhead_ratio_{mode}"]["target"] == ">= 0.85"
    for mode in ("floor_empty_trigger", "floor_bare_insert"):  # the floors are references only
        assert figures[f"writer_overhead_ratio_{mode}"]["target"] is None
        assert figures[f"writer_overhead_ratio_{mode}"]["value"] > 0


def test_quick_compare_run_prints_a_figure_for_every_config(server_url: DatabaseUrl, tmp_path: Path) -> None:
    """bench/compare.py --quick end to end: a median tx/s per workload for every config it did not skip."""
    done = run_quick_script(server_url, "bench/compare.py", tmp_path)
    assert "cores, PostgreSQL" in done.stdout and "bench/compare.py --quick" in done.stdout
    (report,) = tmp_path.glob("*-compare.md")
    medians: dict[str, list[float]] = {}
    for line in report.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 2 and cells[0] not in ("config", "---"):
            medians.setdefault(cells[0], []).append(float(cells[2].replace(",", "")))
    skipped = {name for name in ("pgq",) if f"{name}: skipped" in done.stdout}  # the only optional config
    configs = {"no-trigger", "legacy", "legacy-locked", "capture", "capture-worker", "pgq"} - skipped
    assert set(medians) == configs
    for config in configs:
        assert len(medians[config]) == 3 and all(value > 0 for value in medians[config]), (config, medians)
    assert "left behind at the end of two-jobs" in report.read_text()


def test_quick_retention_run_prints_the_prune_figures(server_url: DatabaseUrl, tmp_path: Path) -> None:
    """bench/retention.py --quick end to end on this tree: a row per snapshot case, every loaded event pruned."""
    done = run_quick_script(server_url, "bench/retention.py", tmp_path)
    assert "cores, PostgreSQL" in done.stdout and "bench/retention.py --quick" in done.stdout
    assert done.stdout.count("pruned 20,000 of 20,000 loaded events") == 2, done.stdout[-3000:]
    (report,) = tmp_path.glob("*-retention.md")
    rows = [line.strip("|").split("|") for line in report.read_text().splitlines() if line.startswith("| after ")]
    assert [row[1].strip() for row in rows] == ["no snapshot", "held snapshot"]
    for row in rows:
        prune_seconds = float(row[2].split("/")[0])
        assert prune_seconds > 0, row


def test_quick_soak_run_writes_samples_and_the_worker_exits_cleanly(server_url: DatabaseUrl, tmp_path: Path) -> None:
    """bench/soak.py --quick end to end: samples in the CSV, a summary, and `outbox run` stopped with exit code 0."""
    done = run_quick_script(server_url, "bench/soak.py", tmp_path)
    assert "cores, PostgreSQL" in done.stdout and "bench/soak.py --quick" in done.stdout
    (samples,) = tmp_path.glob("*-soak.csv")
    rows = samples.read_text().splitlines()
    assert rows[0].startswith("elapsed_s,outbox_bytes,") and len(rows) > 2, rows
    (report,) = tmp_path.glob("*-soak.md")
    assert "- worker exit code: 0" in report.read_text().splitlines(), report.read_text()[-2000:]
    assert "| outbox MB |" in report.read_text()
    assert not list(tmp_path.glob("*.png"))  # --quick draws no plot unless --plot
    # --replot draws that run's plot from its CSV alone; a file that is not a soak CSV is refused in one line.
    picture = tmp_path / "replotted.png"
    redrawn = subprocess.run(
        [sys.executable, "bench/soak.py", "--replot", str(samples), "--plot", str(picture)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert redrawn.returncode == 0, redrawn.stdout + redrawn.stderr
    assert picture.read_bytes().startswith(b"\x89PNG"), redrawn.stdout
    refused = subprocess.run(
        [sys.executable, "bench/soak.py", "--replot", str(report)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0 and "not a soak CSV" in refused.stderr, refused.stderr
