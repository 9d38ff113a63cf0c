"""Make docs/images/dashboard.png: the shipped dashboard's series from a real run, plotted with matplotlib.

    .venv/bin/python deploy/monitoring/dashboard_picture.py --server-url postgresql://postgres@127.0.0.1:5432/postgres

It creates a scratch database on that server (dropped at the end), migrates it, repartitions it
into 2 partitions and starts 2 workers (`outbox run --metrics-port`) and a real Prometheus (the
`prometheus` binary, scraping every 2 s with the shipped rules). Then, for ``--seconds`` (120),
writers drive jobs through the pipeline (some variants fail once and are retried) while the script
makes the things the dashboard is for happen: one worker frozen for a while (SIGSTOP: its
partition's work waits, then drains), hand-written bad events (dead letters), a step the pipeline
lacks (a flagged job), a transaction that wrote an event and stays open, a subscription with no
consumer until late in the run. Last, it reads every panel's expressions of
deploy/monitoring/outbox-dashboard.json through Prometheus's HTTP API (query_range) and draws
them: the picture shows the same series as the dashboard in Grafana, not a mock-up.

Needs the `prometheus` binary (Debian: apt-get install prometheus) and matplotlib (the `dev` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_prometheus import DASHBOARD, LocalPrometheus, free_port

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["ingest", "preprocess", "inference", "iou_eval"]
SCRAPE = 2.0  # seconds, Prometheus's scrape and evaluation interval here
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval would be at this scrape interval (4 scrapes, rounded)


def database_url(server_url: str, name: str) -> str:
    from processor.database import DatabaseUrl

    server = DatabaseUrl.parse(server_url)
    return str(server.url.set(drivername="postgresql", database=name).render_as_string(hide_password=False))


@contextlib.contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    name = f"outbox_dashboard_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield database_url(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def outbox_cli(url: str, *args: str) -> None:
    env = {**os.environ, "OUTBOX_DATABASE_URL": url, "OUTBOX_PIPELINE_STEPS": ",".join(STEPS)}
    subprocess.run([sys.executable, "-m", "processor.cli", *args], env=env, check=True, cwd=ROOT)


class Workers:
    """`outbox run --metrics-port` processes."""

    def __init__(self, url: str, count: int, logdir: Path) -> None:
        env = {**os.environ, "OUTBOX_DATABASE_URL": url, "OUTBOX_PIPELINE_STEPS": ",".join(STEPS)}
        self.ports = [free_port() for _ in range(count)]
        self.processes = []
        for i, port in enumerate(self.ports):
            log = open(logdir / f"worker-{i}.log", "wb")  # noqa: SIM115 - the process writes it until the end
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "processor.cli", "run", "--metrics-port", str(port)],
                    env={**env, "OUTBOX_STANDBY_INTERVAL": "1"},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            )

    def metrics(self, i: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[i]}/metrics", timeout=5) as answer:
            return str(answer.read().decode())

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                pages = [self.metrics(i) for i in range(len(self.ports))]
            except OSError:
                time.sleep(0.2)
                continue
            if all(" 1.0" in _line(page, "outbox_active_consumer{") for page in pages) and any(
                "outbox_metrics_scanner 1.0" in page for page in pages
            ):
                return
            time.sleep(0.2)
        raise RuntimeError("the workers did not each take a partition within 60 s")

    def scanner(self) -> int:
        return next(i for i in range(len(self.ports)) if "outbox_metrics_scanner 1.0" in self.metrics(i))

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _line(page: str, prefix: str) -> str:
    return "\n".join(line for line in page.splitlines() if line.startswith(prefix))


class Writers:
    """Threads that create jobs and walk their variants through the pipeline, each change committed alone."""

    def __init__(self, url: str, threads: int, rate: float, seed: int) -> None:
        self.url = url
        self.stop = threading.Event()
        self.rate = rate / threads  # updates per second per thread
        self.threads = [
            threading.Thread(target=self._run, args=(random.Random(seed + i),), daemon=True) for i in range(threads)
        ]
        self.updates = 0

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, rng: random.Random) -> None:
        import outbox

        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                with conn.transaction():
                    _, variants = outbox.create_job(conn, variants=rng.randint(3, 6))
                walks = {v: 0 for v in variants}
                while walks and not self.stop.is_set():
                    variant = rng.choice(list(walks))
                    step = walks[variant]
                    if step == len(STEPS):
                        status, current = "done", STEPS[-1]
                        del walks[variant]
                    elif rng.random() < 0.03:
                        status, current = "failed", STEPS[step]  # retried: the walk goes on at this step
                    else:
                        status, current = "running", STEPS[step]
                        walks[variant] = step + 1
                    conn.execute(
                        "UPDATE jobs_variants SET status = %s, current_step = %s WHERE job_variants_id = %s",
                        [status, current, variant],
                    )
                    self.updates += 1
                    self.stop.wait(rng.expovariate(self.rate))


def bad_events(url: str) -> None:
    """Hand-written events the worker cannot apply (dead letters), and a step the pipeline lacks (a flag)."""
    import outbox

    insert = (
        "INSERT INTO outbox_events (event_type, schema_version, job_id, variant_id, variant_version, payload) "
        "VALUES (%s, 1, %s, %s, nextval('outbox_variant_versions'), %s::jsonb)"
    )
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            job, (a, b, c) = outbox.create_job(conn, variants=3)
        conn.execute(insert, ["variant_changed", job, a, '{"status": "exploded"}'])
        conn.execute(insert, ["variant_changed", job, b, '{"step": "ingest"}'])
        conn.execute(insert, ["job_exploded", job, c, "{}"])
        with conn.transaction():
            _, (variant,) = outbox.create_job(conn, variants=1)
        conn.execute("UPDATE jobs_variants SET status = 'running', current_step = 'mystery' WHERE job_variants_id = %s",
                     [variant])  # fmt: skip


def open_writer(url: str, seconds: float, stop: threading.Event) -> None:
    """A transaction that writes an event, then stays open (its events wait for its commit)."""
    import outbox

    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            _, (variant,) = outbox.create_job(conn, variants=1)
        with conn.transaction():
            conn.execute("UPDATE jobs_variants SET status = 'running', current_step = 'ingest' "
                         "WHERE job_variants_id = %s", [variant])  # fmt: skip
            stop.wait(seconds)


def run(server_url: str, seconds: float, out: Path, rate: float) -> None:
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="outbox-dashboard-") as tmp, scratch_database(server_url) as url:
        workdir = Path(tmp)
        outbox_cli(url, "migrate")
        outbox_cli(url, "repartition", "2")
        workers = Workers(url, 2, workdir)
        stop = threading.Event()
        try:
            workers.wait_ready()
            targets = [f"127.0.0.1:{port}" for port in workers.ports]
            with LocalPrometheus(workdir / "prometheus", targets, interval=f"{SCRAPE:g}s") as prometheus:
                start = time.time()
                with psycopg.connect(url, autocommit=True) as conn:
                    from processor import subscriptions

                    subscriptions.create(conn, "reactions", from_start=True, to_statuses=None)
                writers = Writers(url, threads=4, rate=rate, seed=7)
                writers.start()
                timeline(workers, url, seconds, stop)
                writers.join()
                time.sleep(3 * SCRAPE)  # the last scrapes
                end = time.time()
                print(f"{writers.updates} variant updates in {end - start:.0f} s; plotting", file=sys.stderr)
                plot(prometheus, start, end, out, f"{started_at}: 2 workers, 2 partitions, {end - start:.0f} s")
        finally:
            stop.set()
            workers.stop()


def timeline(workers: Workers, url: str, seconds: float, stop: threading.Event) -> None:
    """What happens during the run, at fractions of it."""
    frozen = 1 - workers.scanner()  # freeze the worker that does not compute the scanned gauges
    events: list[tuple[float, str, Any]] = [
        (0.15, "freeze a worker", lambda: workers.processes[frozen].send_signal(signal.SIGSTOP)),
        (0.30, "thaw it", lambda: workers.processes[frozen].send_signal(signal.SIGCONT)),
        (0.40, "bad events", lambda: bad_events(url)),
        (0.50, "open writer", lambda: threading.Thread(target=open_writer, args=(url, seconds * 0.2, stop)).start()),
        (0.75, "subscriber", lambda: threading.Thread(target=consume, args=(url, stop), daemon=True).start()),
    ]
    begin = time.monotonic()
    for at, what, action in events:
        time.sleep(max(0.0, begin + at * seconds - time.monotonic()))
        print(f"{time.monotonic() - begin:5.1f} s: {what}", file=sys.stderr)
        action()
    time.sleep(max(0.0, begin + seconds - time.monotonic()))


def consume(url: str, stop: threading.Event) -> None:
    import outbox

    def handle(_conn: Any, _transition: Any) -> None:
        time.sleep(0.001)

    subscriber = outbox.Subscriber("reactions", url, handle)
    with subscriber:
        stop.wait()


def series(prometheus: LocalPrometheus, expr: str, start: float, end: float) -> list[tuple[dict[str, str], Any]]:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    found = []
    for result in prometheus.query_range(expr, start, end, SCRAPE):
        times = [float(t) - start for t, _ in result["values"]]
        values = [float(v) for _, v in result["values"]]
        found.append((result["metric"], (times, values)))
    return found


def legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text or ", ".join(f"{k}={v}" for k, v in labels.items()) or "value"


def plot(prometheus: LocalPrometheus, start: float, end: float, out: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    stats = [p for p in dashboard["panels"] if p["type"] == "stat"]
    charts = [p for p in dashboard["panels"] if p["type"] == "timeseries"]
    columns = 3
    rows = 1 + -(-len(charts) // columns)
    fig = plt.figure(figsize=(18, 3.6 * rows), dpi=100)
    grid = fig.add_gridspec(rows, 1, height_ratios=[0.55] + [1] * (rows - 1), hspace=0.45)
    top = grid[0].subgridspec(1, len(stats), wspace=0.15)
    for i, panel in enumerate(stats):
        ax = fig.add_subplot(top[i])
        ax.set_axis_off()
        ax.set_title(panel["title"], fontsize=10)
        texts = []
        for target in panel["targets"]:
            for labels, (_, values) in series(prometheus, target["expr"], start, end):
                last = values[-1] if values else float("nan")
                if panel.get("options", {}).get("textMode") == "name":
                    texts.append(legend(target["legendFormat"], labels))
                else:
                    unit = " s" if panel["fieldConfig"]["defaults"].get("unit") == "s" else ""
                    texts.append(f"{last:,.0f}{unit}" if last >= 10 or last == int(last) else f"{last:.2f}{unit}")
        ax.text(0.5, 0.4, " / ".join(texts) or "-", ha="center", va="center", fontsize=20, weight="bold")
    body = grid[1:].subgridspec(rows - 1, columns, hspace=0.55, wspace=0.2)
    for i, panel in enumerate(charts):
        ax = fig.add_subplot(body[i // columns, i % columns])
        ax.set_title(panel["title"], fontsize=10)
        for target in panel["targets"]:
            for labels, (times, values) in series(prometheus, target["expr"], start, end):
                ax.plot(times, values, label=legend(target["legendFormat"], labels), linewidth=1.3)
        unit = panel["fieldConfig"]["defaults"].get("unit")
        ax.set_ylabel({"s": "seconds", "ops": "per second"}.get(unit, ""), fontsize=8)
        ax.set_xlabel("seconds into the run", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{dashboard['title']} (deploy/monitoring/outbox-dashboard.json)\n{subtitle}", fontsize=13)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    print(f"wrote {out}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--server-url",
        default=os.environ.get("OUTBOX_TEST_DATABASE_URL"),
        help="a maintenance database on a server where a scratch database may be created "
        "(default: OUTBOX_TEST_DATABASE_URL)",
    )
    parser.add_argument("--seconds", type=float, default=120.0, help="length of the run")
    parser.add_argument("--rate", type=float, default=300.0, help="variant updates per second, all writers")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "dashboard.png")
    args = parser.parse_args()
    if not args.server_url:
        parser.error("--server-url (or OUTBOX_TEST_DATABASE_URL) is required")
    run(args.server_url, args.seconds, args.out, args.rate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
