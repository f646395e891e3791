"""deploy/: the Prometheus rules and the Grafana dashboard, checked with real tools.

- A real `promtool` (Debian's `prometheus` package, installed by .ci/run) checks the
  rules (`check rules`), runs their unit tests (`test rules` on rules_test.yaml: the
  error-ratio, Redis-down and other alerts fire on synthetic series, and stay quiet
  below their thresholds), and parses every PromQL query of the dashboard (written
  into a throwaway rule file, Grafana's variables replaced). A missing promtool fails,
  never skips.
- Every metric the rules and the dashboard query is one a real sidecar exports: the
  dev stack (mock provider + sidecar + Envoy) answers one request and its /metrics is
  read; recording rules' own names must be recorded in rules.yaml, and `up` is the
  one series Prometheus itself makes.
- Every alert has a severity, a summary, a description and a runbook that is a
  section of deploy/README.md; the dashboard has the panels the issue lists.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.dev.devstack import Stack

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "ai-gateway.json"
README = DEPLOY / "README.md"
# Series that Prometheus makes itself for every target, not the sidecar.
PROMETHEUS_OWN = {"up"}
# What the dashboard must show (issue 13), as the metric families behind the panels.
DASHBOARD_MUST_QUERY = {
    "ai_gateway_requests_total",  # requests by route/status
    "ai_gateway_tokens_total",  # tokens by model/consumer
    "ai_gateway_time_to_first_token_seconds_bucket",
    "ai_gateway_time_per_output_token_seconds_bucket",
    "ai_gateway_active_streams",
    "ai_gateway_errors_total",  # errors by kind
    "ai_gateway_guard_findings_total",
    "ai_gateway_ratelimit_decisions_total",
    "ai_gateway_ratelimit_store_up",  # Redis store up
    "ai_gateway_jwks_stale",
    "ai_gateway_worker_streams_total",
    "ai_gateway_config_reloads_total",
}

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: install Debian's prometheus package (.ci/run does)"
    return path


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (not functions, labels, keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges, subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: panel targets and variable queries."""
    board = dashboard()
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert inner, f"variable {variable['name']}: not label_values(selector, label)"
            queries.append(inner.group(1))
    return queries


def as_promql(query: str) -> str:
    """A Grafana query as plain PromQL: its variables replaced by what they can be."""
    query = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", query)
    return re.sub(r"\$\{?\w+\}?", ".*", query)


def exported(metrics_text: str) -> set[str]:
    """The series names a /metrics page can have, from its TYPE lines and samples."""
    names = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "counter":
                names.add(name if name.endswith("_total") else f"{name}_total")
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][\w:]*", line).group(0))
    return names


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as dashes."""
    found = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


# -- promtool ------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    result = run_promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_runs_the_rules_unit_tests() -> None:
    """rules_test.yaml: the error-ratio, Redis-down, JWKS, limit, saturation and TTFT
    alerts fire on synthetic series (and the error ratio stays quiet at 2%)."""
    tested = set(re.findall(r"alertname:\s*(\w+)", RULES_TEST.read_text()))
    assert {"AIGatewayHighErrorRatio", "AIGatewayRedisDown"} <= tested
    result = run_promtool("test", "rules", RULES_TEST)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_refuses_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: promtool exits non-zero on a bad expression."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "x", "rules": [{"alert": "X", "expr": "sum(rate(a[5m])"}]}]}
        )
    )
    assert run_promtool("check", "rules", bad).returncode != 0


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    queries = dashboard_queries()
    group = {
        "name": "dashboard",
        "rules": [
            {"record": f"dashboard:query_{i}", "expr": as_promql(q)} for i, q in enumerate(queries)
        ],
    }
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    result = run_promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


# -- the rules and the dashboard themselves ------------------------------------------


def test_every_alert_has_severity_summary_description_and_a_runbook_section() -> None:
    sections = anchors(README.read_text())
    assert len(alerts()) >= 8
    for alert in alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}, name
        notes = alert["annotations"]
        assert notes["summary"] and notes["description"], name
        page, _, anchor = notes["runbook"].partition("#")
        assert page == "deploy/README.md", name
        assert anchor in sections, f"{name}: no section #{anchor} in deploy/README.md"


def test_the_issue_s_alerts_are_all_there() -> None:
    expressions = {a["alert"]: a["expr"] for a in alerts()}
    recorded = {r["record"]: r["expr"] for r in rules() if "record" in r}

    def expanded(alert: str) -> str:
        """The alert's expression with the recording rules it uses written out."""
        expr = expressions[alert]
        for name, body in recorded.items():
            expr = expr.replace(name, body)
        return expr

    assert 'status=~"5.."' in expanded("AIGatewayHighErrorRatio")
    assert "guard_blocked" in expanded("AIGatewayGuardBlocksHigh")
    assert "limited" in expanded("AIGatewayRateLimitRefusalsHigh")
    assert "histogram_quantile(0.99" in expanded("AIGatewayTTFTHigh")
    assert "ai_gateway_extproc_message_seconds" in expanded("AIGatewaySidecarSaturated")
    assert "ai_gateway_ratelimit_store_up" in expanded("AIGatewayRedisDown")
    assert "ai_gateway_jwks_stale" in expanded("AIGatewayJWKSStale")
    for alert in alerts():  # a blip must not page: only counted events fire at once
        assert "for" in alert or "increase(" in alert["expr"], alert["alert"]


def test_dashboard_has_the_panels_the_issue_lists() -> None:
    board = dashboard()
    queried = set().union(*(metric_names(as_promql(q)) for q in dashboard_queries()))
    assert queried >= DASHBOARD_MUST_QUERY, sorted(DASHBOARD_MUST_QUERY - queried)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert {v["name"] for v in board["templating"]["list"]} >= {"datasource", "route", "model"}
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for word in ("p50", "p99", "time to first token", "time per output token"):
        assert word in titles, word


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells


def test_readme_links_resolve() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    assert "../docs/observability.md" in links
    for link in links:
        if "://" not in link:
            assert (README.parent / link).exists(), f"deploy/README.md links a missing {link}"


def test_metric_names_reads_promql() -> None:
    """The name finder the next test relies on: functions, labels, keywords, ranges
    and strings are not names, everything else is."""
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(foo_bucket{a="b{c}", '
        "d=~'x|y'}[5m]))) / on (instance) group_left (job) bar:ratio:rate5m > 0.5 "
        "and time() - baz offset 5m unless count without (worker) (qux) > bool 1e3"
    )
    assert metric_names(expr) == {"foo_bucket", "bar:ratio:rate5m", "baz", "qux"}


# -- against a real sidecar ----------------------------------------------------------


@pytest.fixture(scope="module")
def scraped(stack: Stack) -> set[str]:
    """The sidecar's /metrics after one request through Envoy."""
    response = httpx.post(
        f"{stack.base_url}/openai",
        json={"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hi"}]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    text = httpx.get(stack.metrics_url, timeout=5).text
    assert 'ai_gateway_requests_total{model="gpt-3.5-turbo",route="openai",status="200"}' in text
    return exported(text)


def test_every_metric_the_rules_query_is_exported(scraped: set[str]) -> None:
    recorded = {r["record"] for r in rules() if "record" in r}
    used = set().union(*(metric_names(r["expr"]) for r in rules()))
    assert used & recorded, "the alerts use the recording rules"
    unknown = used - scraped - recorded - PROMETHEUS_OWN
    assert not unknown, f"rules query what the sidecar does not export: {sorted(unknown)}"
    assert {n for n in used if ":" in n} <= recorded, "a recording rule name not recorded"


def test_every_metric_the_dashboard_queries_is_exported(scraped: set[str]) -> None:
    used = set().union(*(metric_names(as_promql(q)) for q in dashboard_queries()))
    unknown = used - scraped
    assert not unknown, f"the dashboard queries what the sidecar does not export: {sorted(unknown)}"


def test_exported_names_follow_the_exposition(scraped: set[str]) -> None:
    """`exported` reads histograms and counters as Prometheus stores them."""
    assert "ai_gateway_time_to_first_token_seconds_bucket" in scraped
    assert "ai_gateway_time_to_first_token_seconds" not in scraped
    assert "ai_gateway_requests_total" in scraped
    assert "ai_gateway_requests" not in scraped
    assert "ai_gateway_made_up_total" not in scraped
