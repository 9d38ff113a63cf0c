"""A real Prometheus on this machine with a configuration of its own: for the tests and the dashboard picture.

It scrapes the given workers' /metrics every ``interval``, evaluates the given rule files as often,
keeps its data in ``workdir`` and listens on a free local port; the HTTP API answers queries and
alerts. Needs the `prometheus` binary (Debian's `prometheus` package; .ci/run installs it).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

HERE = Path(__file__).resolve().parent
RULES = HERE / "outbox-alerts.yml"
DASHBOARD = HERE / "outbox-dashboard.json"


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalPrometheus:
    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        *,
        rule_files: Sequence[Path] = (RULES,),
        interval: str = "1s",
        job: str = "outbox",
    ) -> None:
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("no `prometheus` binary on PATH (Debian: apt-get install prometheus)")
        self.binary = binary
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.rule_files = [Path(f).resolve() for f in rule_files]
        self.interval = interval
        self.job = job
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "prometheus.log"

    def config(self) -> str:
        """prometheus.yml: JSON is YAML, and needs no YAML library here."""
        return json.dumps(
            {
                "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
                "rule_files": [str(f) for f in self.rule_files],
                "scrape_configs": [{"job_name": self.job, "static_configs": [{"targets": self.targets}]}],
            },
            indent=2,
        )

    def start(self) -> LocalPrometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(self.config())
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after 30 s: {self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>: the ``data`` of a successful answer."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as answer:
            body = json.load(answer)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return list(self.api("query_range", query=expr, start=start, end=end, step=step)["result"])

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert now: labels, annotations, state (pending or firing), activeAt."""
        return list(self.api("alerts")["alerts"])
