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
