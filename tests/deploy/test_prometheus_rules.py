"""The alert and recording rules: promtool checks them and runs their unit tests, and every alert
has a firing and a quiet test case, the conventional labels and annotations, and a runbook section."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml
from dashboard import documented_metric_names, promql_metric_names
from deploy_tools import DEPLOY, DOCS, require_tool, run

RULES = DEPLOY / "prometheus" / "stanchion.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "stanchion.rules.test.yml"
RUNBOOK = DOCS / "runbook.md"
# Where docs/runbook.md is published; every runbook_url is this plus "#" plus the alert's anchor.
RUNBOOK_BASE = "https://stanchion.invalid/docs/runbook.md"
SEVERITIES = {"critical", "warning", "info"}


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _alerts() -> list[dict]:
    return [rule for rule in _rules() if "alert" in rule]


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    result = run([promtool, "check", "rules", "--lint=all", "--lint-fatal", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    promtool = require_tool("promtool")
    result = run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules_fails_on_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests really compare labels: one wrong expected severity makes promtool fail."""
    promtool = require_tool("promtool")
    shutil.copy(RULES, tmp_path / RULES.name)
    text = RULE_TESTS.read_text()
    assert "severity: critical" in text
    (tmp_path / RULE_TESTS.name).write_text(text.replace("severity: critical", "severity: warning", 1))
    result = run([promtool, "test", "rules", RULE_TESTS.name], cwd=tmp_path)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def test_every_alert_has_firing_and_quiet_cases() -> None:
    cases: dict[str, list[list]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(case.get("exp_alerts") or [])
    alerts = {rule["alert"] for rule in _alerts()}
    assert set(cases) <= alerts, f"tests for alerts that do not exist: {set(cases) - alerts}"
    missing_firing = sorted(a for a in alerts if not any(cases.get(a, [])))
    missing_quiet = sorted(a for a in alerts if not any(exp == [] for exp in cases.get(a, [])))
    assert not missing_firing, f"alerts without a case where they fire: {missing_firing}"
    assert not missing_quiet, f"alerts without a case where they stay quiet: {missing_quiet}"


def test_recording_rules_are_tested() -> None:
    tested = {
        case["expr"].strip()
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("promql_expr_test", [])
    }
    untested = [rule["record"] for rule in _rules() if "record" in rule and rule["record"] not in tested]
    assert not untested, f"recording rules without a promql_expr_test: {untested}"


def test_alert_labels_and_annotations() -> None:
    for rule in _alerts():
        name = rule["alert"]
        assert name.startswith("Stanchion"), name
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        assert annotations["runbook_url"] == f"{RUNBOOK_BASE}#{name.lower()}", name


def test_runbook_has_one_section_per_alert() -> None:
    headings = re.findall(r"^## (\S+)\s*$", RUNBOOK.read_text(), flags=re.MULTILINE)
    alerts = [rule["alert"] for rule in _alerts()]
    assert sorted(h for h in headings if h.startswith("Stanchion")) == sorted(alerts)
    for name in alerts:
        # GitHub's anchor for "## StanchionFoo" is "#stanchionfoo"; the section must explain the
        # meaning, what Stanchion already did and what to check.
        section = RUNBOOK.read_text().split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("**Meaning.**", "**Already done.**", "**Check.**"):
            assert part in section, f"{name}: runbook section lacks {part}"


def test_rules_use_documented_metrics_and_the_job_id_label() -> None:
    documented = documented_metric_names(DOCS / "metrics.md")
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    for rule in _rules():
        expr = rule["expr"]
        unknown = promql_metric_names(expr) - documented - recorded - {"up"}
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: undocumented metrics {unknown}"
        # Stanchion's job label is job_id; `job` is Prometheus's scrape job.
        for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            assert "job" not in [label.strip() for label in clause.split(",")], expr
