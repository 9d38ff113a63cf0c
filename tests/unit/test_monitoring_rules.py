"""The shipped alert rules and dashboard (deploy/monitoring): checked and unit-tested with promtool."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from tests.monitoring import (
    DASHBOARD,
    RULE_TESTS,
    RULES,
    alert_rules,
    dashboard_exprs,
    exported_names,
    metric_names,
    require,
)


def test_promtool_accepts_the_rules():
    promtool = require("promtool")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_of_every_rule_pass():
    promtool = require("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_rule_has_a_test_that_fires_it_and_a_runbook_naming_the_command():
    tested = yaml.safe_load(RULE_TESTS.read_text())
    fired = {
        case["alertname"]
        for group in tested["tests"]
        for case in group.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for group in tested["tests"]
        for case in group.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    rules = alert_rules()
    assert {r["alert"] for r in rules} == fired == quiet  # each rule fires in a test, and stays quiet in one
    for rule in rules:
        assert re.search(r"`outbox [a-z-]+", rule["annotations"]["runbook"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_dashboard_is_importable_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len(dashboard_exprs()) >= 15


def test_metric_names_are_read_out_of_promql():
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(outbox_batch_duration_seconds_bucket{partition=~"$p"}[5m])))'
    ) == {"outbox_batch_duration_seconds_bucket"}
    assert metric_names(
        "(max by (partition) (outbox_pending_events) > 0) unless on (partition) "
        "(sum by (partition) (increase(outbox_events_applied_total[5m] offset 1m)) > 1e3)"
    ) == {"outbox_pending_events", "outbox_events_applied_total"}
    assert metric_names("count(max by (partition) (a) == 1) < max(b) or absent(c == 1) or vector(0)") == {"a", "b", "c"}
    assert metric_names('ALERTS{alertname=~"Outbox.*", alertstate="firing"}') == {"ALERTS"}
    assert metric_names("sum without (instance) (rate(x_total[$__rate_interval])) / on() group_left y") == {
        "x_total",
        "y",
    }


def test_exported_names_come_from_type_lines_and_samples():
    page = '# TYPE a_total counter\n# TYPE h histogram\n# TYPE g gauge\ng{x="1"} 2.0\n# TYPE empty gauge\n'
    assert exported_names(page) == {"a_total", "a_created", "h_bucket", "h_sum", "h_count", "h_created", "g", "empty"}
