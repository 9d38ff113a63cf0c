"""One drain, in a process of its own: run the worker until idle and print what it cost, as JSON.

    python bench/drain_child.py --database-url URL [--batch-size 1000] [--steps a,b,c]

bench/run.py starts this once per measured drain, so that the peak RSS is the worker's alone (not
the benchmark's, nor an earlier drain's) and the rate leaves out the interpreter's start-up. Prints
one JSON object: events, batches, dead_letters, seconds (measured around ``Worker.run`` only), events_per_second,
rss_baseline_kb (peak RSS once everything is imported and the settings are built, before the
worker starts) and rss_peak_kb (peak RSS after the drain), both from getrusage (kB on Linux).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from processor.database import DatabaseUrl
from processor.settings import load_settings
from processor.worker import Worker


def peak_rss_kb() -> int:
    """Peak resident set size of this process so far (ru_maxrss: kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--steps", default="ingest,detect,segment,iou_eval")
    args = parser.parse_args()
    settings = load_settings(database_url=args.database_url, pipeline_steps=args.steps, batch_size=args.batch_size)
    db = DatabaseUrl.parse(args.database_url)
    baseline = peak_rss_kb()
    started = time.perf_counter()
    stats = Worker(settings, db).run(until_idle=True)
    seconds = time.perf_counter() - started
    result = {
        "events": stats.events,
        "batches": stats.batches,
        "dead_letters": stats.dead_letters,
        "batch_size": args.batch_size,
        "seconds": round(seconds, 4),
        "events_per_second": round(stats.events / seconds, 1) if seconds > 0 else None,
        "rss_baseline_kb": baseline,
        "rss_peak_kb": peak_rss_kb(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
