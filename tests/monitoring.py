"""What the monitoring tests share: the shipped rules and dashboard, PromQL's metric names, a local Prometheus."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
RULES = MONITORING / "outbox-alerts.yml"
RULE_TESTS = MONITORING / "tests" / "outbox-alerts.test.yml"
DASHBOARD = MONITORING / "outbox-dashboard.json"

# Series Prometheus itself makes, which a rule or a panel may read.
PROMETHEUS_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds"})


def _load_local_prometheus() -> Any:
    """deploy/monitoring/local_prometheus.py (the dashboard picture's script uses it too), by path."""
    spec = importlib.util.spec_from_file_location("local_prometheus", MONITORING / "local_prometheus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("local_prometheus", module)
    spec.loader.exec_module(module)
    return module


local_prometheus = _load_local_prometheus()


def require(tool: str) -> str:
    """The tool's path; skip, saying how to get it, when it is not installed."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"`{tool}` is not installed (Debian's `prometheus` package has it; .ci/run installs it)")
    return path


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard: its panels' targets and its annotations."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    return exprs + [a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a]


_NOT_METRICS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
    | {"inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: a small tokenizer, enough for the shipped expressions.

    Strings, label matchers ``{...}``, ranges ``[...]``, Grafana variables and the label lists of
    by/without/on/ignoring/group_left/group_right are removed first; then every identifier that is
    not a keyword, not a function or aggregation (followed by ``(`` or by a ``by``/``without``
    clause) and not part of a number is a metric name.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        name, rest = match.group(), text[match.end() :].lstrip()
        if name.lower() in _NOT_METRICS or rest.startswith("(") or re.match(r"(by|without)\b", rest):
            continue
        names.add(name)
    return names


def exported_names(exposition: str) -> set[str]:
    """The series names a /metrics page exports, from its TYPE lines (a family with no sample yet counts)
    and its samples: a counter's ``_total``, a histogram's ``_bucket``, ``_sum`` and ``_count``."""
    names = set()
    suffixes = {"counter": ("", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}
    suffixes["summary"] = ("", "_sum", "_count", "_created")
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "counter" and name.endswith("_total"):
                names.update({name, name.removesuffix("_total") + "_created"})
            else:
                names.update(name + suffix for suffix in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names
