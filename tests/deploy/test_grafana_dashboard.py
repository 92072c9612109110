"""The Grafana dashboard: its structure, and that every query uses only metrics from
docs/metrics.md and parses as PromQL (promtool checks each one as a recording rule)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from dashboard import (
    dashboard_exprs,
    dashboard_metric_names,
    dashboard_panels,
    documented_metric_names,
    promql_metric_names,
)
from deploy_tools import DEPLOY, DOCS, require_tool, run

DASHBOARD = DEPLOY / "grafana" / "stanchion-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's built-in variables, replaced by something Prometheus accepts for the syntax check.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__range": "6h",
    "$__interval": "1m",
    "$job_id": ".*",
    "$instance": ".*",
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_identity_and_datasource_variable() -> None:
    board = dashboard()
    assert board["uid"] == "stanchion-overview"
    assert board["title"] == "Stanchion"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job_id", "instance"):
        assert variables[name]["datasource"] == DATASOURCE


def test_panels_have_unique_ids_targets_and_the_datasource_variable() -> None:
    panels = dashboard_panels(DASHBOARD)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":  # rows group panels; they have no queries of their own
            continue
        assert panel["title"] and panel["datasource"] == DATASOURCE, panel["title"]
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no targets"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_dashboard_uses_only_documented_metrics() -> None:
    documented = documented_metric_names(DOCS / "metrics.md")
    used = dashboard_metric_names(DASHBOARD)
    assert used, "no metric names found"
    assert used <= documented, f"not in docs/metrics.md: {sorted(used - documented)}"
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            assert m and m.group(1) in documented, variable["definition"]


def test_dashboard_covers_what_operators_look_for() -> None:
    used = dashboard_metric_names(DASHBOARD)
    required = {
        "stanchion_job_state",
        "stanchion_train_loss",
        "stanchion_train_grad_norm",
        "stanchion_train_activation_norm",
        "stanchion_train_step_seconds",
        "stanchion_train_tokens_total",
        "stanchion_job_restarts_total",
        "stanchion_recovery_seconds",
        "stanchion_gpu_temperature_celsius",
        "stanchion_gpu_power_watts",
        "stanchion_gpu_utilization_ratio",
        "stanchion_gpu_memory_used_bytes",
        "stanchion_gpu_xid_errors_total",
        "stanchion_gpu_ecc_errors_total",
    }
    assert required <= used, f"missing: {sorted(required - used)}"


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    rules = []
    for i, expr in enumerate(dashboard_exprs(DASHBOARD)):
        for variable, replacement in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(variable, replacement)
        assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('stanchion_gpu_temperature_celsius{instance=~"$instance"}', {"stanchion_gpu_temperature_celsius"}),
        (
            'histogram_quantile(0.9, sum by (job_id, le) (rate(stanchion_train_step_seconds_bucket{job_id=~"$job_id"}[$__rate_interval])))',
            {"stanchion_train_step_seconds"},
        ),
        (
            "sum(increase(stanchion_recovery_seconds_sum[1h])) / sum(increase(stanchion_recovery_seconds_count[1h]))",
            {"stanchion_recovery_seconds"},
        ),
        (
            'max(a_total) by (job_id) / on (instance) group_left (UUID) b offset 5m > bool 1e-3 and time() - c{x="by (d)"}',
            {"a_total", "b", "c"},
        ),
        ("sum without (scope) (rate(x[5m:1m])) unless absent(y{z='w'})", {"x", "y"}),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names
