"""The shipped monitoring (deploy/monitoring) against a real worker: a real Prometheus scrapes `outbox run
--metrics-port` with the shipped rules and sees an alert fire when the worker dies, and every metric the
dashboard and the rules read is one the worker exports."""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

import yaml

from processor.database import connect
from tests.fix_database import subprocess_env
from tests.helpers import WorkerProcess, consumer_os_pid, finish_jobs, pending_work, wait_for
from tests.monitoring import (
    PROMETHEUS_SERIES,
    alert_rules,
    dashboard_exprs,
    exported_names,
    local_prometheus,
    metric_names,
    require,
)


def metrics_page(port: int) -> str:
    return str(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())


def start_worker(db, tmp_path: Path) -> tuple[WorkerProcess, int]:
    """`outbox run --metrics-port` as a subprocess, once it consumes the partition and has scanned."""
    port = local_prometheus.free_port()
    worker = WorkerProcess(subprocess_env(db, OUTBOX_METRICS_PORT=str(port)), tmp_path / "worker.log")
    with connect(db, application_name="observer") as conn:
        wait_for(lambda: consumer_os_pid(conn) == worker.pid, what="the worker to start")
    wait_for(
        lambda: (
            'outbox_active_consumer{partition="0"} 1.0' in (page := metrics_page(port))
            and "outbox_metrics_scanner 1.0" in page
        ),
        what="the worker to consume and scan",
    )
    return worker, port


def test_every_metric_the_dashboard_and_the_rules_read_is_one_the_worker_exports(db, engine, tmp_path):
    worker, port = start_worker(db, tmp_path)
    try:
        finish_jobs(engine, 3)  # a few batches: every family has samples, not only its TYPE line
        with connect(db, application_name="observer") as conn:
            wait_for(lambda: pending_work(conn) == 0, what="the worker to apply")
        exported = exported_names(metrics_page(port))
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    read: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            read.setdefault(name, set()).add(f"rule {rule['alert']}")
    for expr in dashboard_exprs():
        for name in metric_names(expr):
            read.setdefault(name, set()).add("dashboard")
    missing = {name: sorted(where) for name, where in read.items() if name not in exported | PROMETHEUS_SERIES}
    assert not missing, f"read but not exported by the worker: {missing}"
    # The tokenizer found what the files obviously read (it does not silently find nothing).
    assert {"outbox_active_consumer", "outbox_events_applied_total", "outbox_batch_duration_seconds_bucket"} <= set(
        read
    )
    unused = sorted(n for n in exported if n.startswith("outbox_") and not n.endswith("_created") and n not in read)
    print(f"\n{len(read)} metric names read by the rules and the dashboard, all exported; exported, unread: {unused}")


def test_a_real_prometheus_fires_an_alert_when_the_worker_dies(db, tmp_path):
    require("prometheus")
    # The shipped rules with `for` cut to 2 s: the expressions are what is tested here (promtool's
    # unit tests cover the durations), and the test need not wait a minute.
    rules = yaml.safe_load(local_prometheus.RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "2s"
    rules_file = tmp_path / "outbox-alerts.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    worker, port = start_worker(db, tmp_path)
    try:
        with local_prometheus.LocalPrometheus(
            tmp_path / "prometheus", [f"127.0.0.1:{port}"], rule_files=[rules_file], interval="1s"
        ) as prometheus:
            started = time.monotonic()
            wait_for(lambda: prometheus.query("max(outbox_active_consumer) == 1"), what="prometheus to scrape")
            scraped_in = time.monotonic() - started
            time.sleep(4)  # a few evaluations beyond `for`: a healthy worker raises no alert, not even pending
            assert prometheus.alerts() == [], prometheus.alerts()

            worker.kill()  # SIGKILL: no clean release; its scrape fails, its series go stale at once
            killed = time.monotonic()

            def firing() -> dict | None:
                found = [a for a in prometheus.alerts() if a["labels"]["alertname"] == "OutboxNoActiveConsumer"]
                return found[0] if found and found[0]["state"] == "firing" else None

            alert = wait_for(firing, timeout=60, what="OutboxNoActiveConsumer to fire")
            fired_in = time.monotonic() - killed
    finally:
        worker.kill()
    assert alert["labels"]["severity"] == "critical"
    assert "`outbox backlog`" in alert["annotations"]["runbook"]
    print(f"\nscraped in {scraped_in:.1f} s; OutboxNoActiveConsumer fired {fired_in:.1f} s after the kill")
