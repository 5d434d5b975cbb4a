"""The monitoring configuration: alert rules valid and unit-tested with promtool, the example Prometheus
config valid, the Grafana dashboard loadable, and every portal metric they name exported by /metrics."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REQUIRE_SERVICES

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "ops" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "portal-dashboard.json"
PORTAL_METRIC = re.compile(r"\bportal_[a-z0-9_]+\b")
# The alerts the source document asks for, and the portal's own.
REQUIRED_ALERTS = {
    "HostCpuHigh",
    "HostMemoryHigh",
    "GpuUtilisationHigh",
    "GpuMemoryHigh",
    "DatabaseDiskLatencyHigh",
    "PortalPoolFreeCapacityLow",
    "PortalQueueWaitLong",
    "PortalWebhookErrors",
    "PortalWebhookRejected",
    "PortalProvisioningFailures",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    """Debian's prometheus package provides /usr/bin/promtool; CI (PORTAL_REQUIRE_SERVICES=1) installs it."""
    path = shutil.which("promtool")
    if path is None:
        message = "needs promtool: apt-get install -y --no-install-recommends prometheus"
        if REQUIRE_SERVICES:
            pytest.fail(f"PORTAL_REQUIRE_SERVICES=1 but promtool is missing ({message})")
        pytest.skip(message)
    return path


def run(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every query in the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def test_promtool_accepts_the_alert_rules(promtool):
    result = run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_the_alerts_fire_at_their_thresholds_and_not_below(promtool):
    result = run(promtool, "test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alert_unit_tests_cover_the_documents_thresholds():
    tested = {
        case["alertname"]
        for test in yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    assert {"HostCpuHigh", "GpuUtilisationHigh", "GpuMemoryHigh", "PortalPoolFreeCapacityLow"} <= tested
    assert {"HostMemoryHigh", "DatabaseDiskLatencyHigh"} <= tested


def test_the_example_prometheus_config_is_valid(promtool):
    result = run(promtool, "check", "config", "--syntax-only", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    portal = next(job for job in config["scrape_configs"] if job["job_name"] == "gpu-portal")
    assert portal["metrics_path"] == "/metrics" and portal["authorization"]["type"] == "Bearer"


def test_every_alert_has_a_severity_a_summary_and_a_description():
    found = {rule["alert"] for rule in rules()}
    assert found >= REQUIRED_ALERTS
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_thresholds_are_the_documents():
    expressions = {rule["alert"]: " ".join(rule["expr"].split()) for rule in rules()}
    durations = {rule["alert"]: rule.get("for") for rule in rules()}
    assert expressions["HostCpuHigh"].endswith("> 80") and durations["HostCpuHigh"] == "5m"
    assert expressions["HostMemoryHigh"].endswith("> 90") and durations["HostMemoryHigh"] == "5m"
    assert expressions["GpuUtilisationHigh"] == "DCGM_FI_DEV_GPU_UTIL > 95" and durations["GpuUtilisationHigh"] == "5m"
    assert expressions["GpuMemoryHigh"].endswith("> 95")
    assert expressions["DatabaseDiskLatencyHigh"].endswith("> 50")
    assert expressions["DatabaseDiskLatencyHigh"].count('{role="database"}') == 4
    assert expressions["PortalPoolFreeCapacityLow"].endswith("< 0.2")
    assert "[10m]" in expressions["PortalWebhookErrors"] and expressions["PortalWebhookErrors"].endswith("> 0")


def test_the_dashboard_is_grafana_json_with_a_prometheus_datasource_variable():
    board = json.loads(DASHBOARD.read_text())
    [variable] = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert (variable["name"], variable["query"]) == ("datasource", "prometheus")
    panels = [panel for panel in board["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].strip(), panel["title"]


def test_the_dashboard_shows_what_operations_needs():
    expressions = " ".join(expr for _, expr in dashboard_targets())
    for needed in (
        "histogram_quantile(0.5, sum by (le) (rate(portal_http_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(portal_http_request_duration_seconds_bucket",
        "portal_queue_depth",
        "portal_queue_oldest_wait_seconds",
        "max by (pool, gpu_model) (portal_pool_gpu_utilisation_ratio)",
        "portal_tasks",
        "portal_vms",
        "portal_webhook_failures_total",
        "portal_provisioning_failures_total",
        "portal_celery_task_duration_seconds_bucket",
    ):
        assert needed in expressions, needed


def test_the_dashboards_queries_are_valid_promql(promtool, tmp_path):
    # promtool parses expressions inside rule files; Grafana's $__rate_interval becomes a plain range.
    recording = [
        {"record": f"dashboard:query_{n}", "expr": expr.replace("$__rate_interval", "5m")}
        for n, (_, expr) in enumerate(dashboard_targets())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def _exported_series_names(body: str) -> set[str]:
    """Every series name /metrics can produce, from its families' types (a labelled metric nobody has
    touched yet still announces itself with # TYPE)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {
        family.name + suffix
        for family in text_string_to_metric_families(body)
        for suffix in suffixes.get(family.type, [""])
    }


@pytest.mark.django_db
def test_every_portal_metric_the_alerts_and_the_dashboard_use_is_exported(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    exported = _exported_series_names(response.content.decode())
    used = set(PORTAL_METRIC.findall(ALERTS.read_text())) | {
        name for _, expr in dashboard_targets() for name in PORTAL_METRIC.findall(expr)
    }
    assert used, "the alerts and the dashboard name portal metrics"
    assert used - exported == set()
