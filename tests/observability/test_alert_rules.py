"""deploy/observability/: the alerting rules pass ``promtool check rules`` and their unit tests
(``promtool test rules alerts_test.yml``: synthetic series on which every alert fires, and cases
where each stays quiet), and those tests really hold each alert to its cases; the rules and the
Grafana dashboard's queries parse, name only series the gateway's ``/metrics`` has, with the
labels it gives them (so a renamed metric or label breaks a test here), and each panel's query
has series in a real Prometheus scraping a ``GatewayMetrics`` fed a little of everything.

promtool comes from ``deploy/prometheus.sh promtool`` (Debian's ``prometheus`` package, no root),
and is required the way the Prometheus server is (``tests/observability/prometheus_server.py``):
without it these tests fail with the script's error, or skip where FAIRGATE_SKIP_PROMETHEUS=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import DEFAULT_SLO_CLASSES
from gateway.errors import QueueFull, QuotaExhausted, RateLimited
from gateway.metrics import GatewayMetrics, RequestRecord, WorkerSnapshot
from gateway.scheduler import ModelBacklog, TenantState
from tests.deploy_scripts import SCRIPT_TIMEOUT_S, require_path
from tests.observability.prometheus_server import (
    FETCH_SCRIPT,
    SKIP_ENV,
    PrometheusServer,
    require_prometheus,
)

OBSERVABILITY = Path(__file__).resolve().parents[2] / "deploy" / "observability"
ALERTS = OBSERVABILITY / "alerts.yml"
ALERTS_TEST = OBSERVABILITY / "alerts_test.yml"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
PROMTOOL_TIMEOUT_S = 60.0
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# Labels a scrape adds to every series.
TARGET_LABELS = frozenset({"job", "instance"})


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


ALERT_NAMES = [rule["alert"] for rule in _alert_rules()]


# ---- promtool ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> Path:
    """``deploy/prometheus.sh promtool``'s binary; without one, fail with the script's error, or
    skip with it where FAIRGATE_SKIP_PROMETHEUS=1 (as ``require_prometheus`` does)."""
    return require_path(FETCH_SCRIPT, SKIP_ENV, "promtool", "promtool")


def _run(promtool: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )


def _fetch(binary: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    assert bash is not None
    return subprocess.run(
        [bash, str(FETCH_SCRIPT), binary],
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )


def test_the_fetch_script_asked_for_promtool_says_why_without_apt(tmp_path: Path) -> None:
    # An empty PATH: no promtool, no apt-get; an empty cache: no earlier copy.
    (tmp_path / "bin").mkdir()
    done = _fetch("promtool", {"PATH": str(tmp_path / "bin"), "HOME": str(tmp_path / "home")})
    assert (done.returncode, done.stdout) == (1, "")
    assert "no promtool on PATH, and no apt-get" in done.stderr
    assert "FAIRGATE_SKIP_PROMETHEUS=1" in done.stderr
    wrong = _fetch("grafana", {"PATH": str(tmp_path / "bin"), "HOME": str(tmp_path / "home")})
    assert (wrong.returncode, wrong.stdout) == (2, "")
    assert "usage: deploy/prometheus.sh [prometheus|promtool]" in wrong.stderr


def test_a_cache_from_before_promtool_is_fetched_again(tmp_path: Path) -> None:
    """A cache holding prometheus alone (what the script kept before it kept promtool): asked
    for promtool, the script fetches the package again and keeps both."""
    # PATH without either binary, so that the script looks in its cache.
    path = [
        d
        for d in os.environ["PATH"].split(os.pathsep)
        if not any((Path(d) / binary).exists() for binary in ("prometheus", "promtool"))
    ]
    if shutil.which("apt-get", path=os.pathsep.join(path)) is None:
        pytest.skip("Prometheus is installed beside apt-get: PATH without it has no apt-get")
    bin_dir = tmp_path / "prometheus" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "prometheus").symlink_to(require_prometheus())
    env = {"PATH": os.pathsep.join(path), "FAIRGATE_HOME": str(tmp_path), "HOME": str(tmp_path)}
    done = _fetch("promtool", env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(bin_dir / "promtool")
    assert "fetching Debian's prometheus package" in done.stderr
    for binary in ("prometheus", "promtool"):
        assert not (bin_dir / binary).is_symlink(), f"{binary} was not replaced"
        version = subprocess.run(
            [str(bin_dir / binary), "--version"],
            capture_output=True,
            text=True,
            timeout=PROMTOOL_TIMEOUT_S,
            check=False,
        )
        assert version.returncode == 0 and binary in version.stdout + version.stderr
    again = _fetch("prometheus", env)
    assert again.stdout.strip().splitlines()[-1] == str(bin_dir / "prometheus")
    assert "fetching" not in again.stderr


def test_the_rules_pass_promtool_check(promtool: Path) -> None:
    done = _run(promtool, "check", "rules", ALERTS.name, cwd=OBSERVABILITY)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in done.stdout


def test_the_rules_pass_their_unit_tests(promtool: Path) -> None:
    done = _run(promtool, "test", "rules", ALERTS_TEST.name, cwd=OBSERVABILITY)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_does_not() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(ALERT_NAMES) == firing
    assert set(ALERT_NAMES) == quiet
    for rule in _alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]


@pytest.mark.parametrize("alert", ALERT_NAMES)
@pytest.mark.parametrize(("mode", "expr"), [("never", "vector(0) > 1"), ("always", "vector(1)")])
def test_the_unit_tests_fail_an_alert_that_never_or_always_fires(
    promtool: Path, tmp_path: Path, alert: str, mode: str, expr: str
) -> None:
    """alerts_test.yml against a copy of alerts.yml where one alert's expression is replaced:
    the cases that hold it to firing (never) or to staying quiet (always) must fail."""
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = expr
    (tmp_path / ALERTS.name).write_text(yaml.safe_dump(rules))
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    done = _run(promtool, "test", "rules", ALERTS_TEST.name, cwd=tmp_path)
    assert done.returncode != 0, f"{alert} that {mode} fires passed:\n{done.stdout}"
    assert f"alertname: {alert}," in done.stdout + done.stderr


def test_the_dashboards_queries_parse(promtool: Path, tmp_path: Path) -> None:
    """Each panel's query (Grafana's variables given values) as a recording rule: promtool parses
    it like the alerts'."""
    queries = dashboard_queries()
    assert len(queries) >= 20
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:{where}", "expr": expr}
                    for where, expr in queries.items()
                ],
            }
        ]
    }
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    done = _run(promtool, "check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


# ---- what the gateway exposes -----------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _request(tenant: str, slo_class: str) -> RequestRecord:
    return RequestRecord(
        tenant=tenant,
        slo_class=slo_class,
        outcome="ok",
        prompt_tokens=100,
        cached_tokens=32,
        completion_tokens=11,
        queue_s=0.01,
        ttft_s=0.5,
        e2e_s=1.5,
        num_preemptions=1,
        model="smollm2",
    )


@pytest.fixture(scope="module")
def fed_metrics() -> GatewayMetrics:
    """A ``GatewayMetrics`` fed a little of everything: two tenants backlogged over two samples
    (Jain's index needs them), requests of every class ended and refused, a prefill and a decode
    worker with load reports and prefills. Nothing changes it afterwards (its clock stands)."""
    clock = _Clock()
    tenants = [TenantState("t-acme", 3, 1.0), TenantState("t-globex", 2, 2.0)]
    workers = [
        WorkerSnapshot("prefill-1", "prefill", "smollm2", "ready", 2, 40, 1000),
        WorkerSnapshot("decode-1", "decode", "smollm2", "dead", 5, 950, 1000),
    ]
    metrics = GatewayMetrics(
        DEFAULT_SLO_CLASSES,
        lambda: tenants,
        clock=clock,
        model_backlogs=lambda: [ModelBacklog("smollm2", 5, 800, 1.5)],
        cost_factors=lambda: {"smollm2": 1.0},
        requests_in_gateway=lambda: {"t-acme": 3},
        queued_by_class=lambda: {("t-acme", "interactive"): 3, ("t-globex", "batch"): 2},
        workers=lambda: workers,
    )
    for tenant_id, name, weight in (("t-acme", "acme", 1.0), ("t-globex", "globex", 2.0)):
        metrics.tenant_seen(tenant_id, name)
        metrics.tenant_weight(tenant_id, weight)
    metrics.sample()
    for tenant_id, name, weight in (("t-acme", "acme", 1.0), ("t-globex", "globex", 2.0)):
        clock.now += 1.0
        metrics.served(tenant_id, weight, 100, 10)
        metrics.worker_prefilled(workers[0].labels, 100, 32)
        for slo_class in DEFAULT_SLO_CLASSES:
            metrics.finished(_request(name, slo_class.name))
            metrics.rejected(name, slo_class.name, RateLimited.code, "smollm2")
        metrics.sample()
    return metrics


@pytest.fixture(scope="module")
def gateway_series(fed_metrics: GatewayMetrics) -> dict[str, frozenset[str]]:
    """Each series name in the gateway's exposition, with the label names its samples have (a
    scrape adds job and instance)."""
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(fed_metrics.exposition().decode()):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    assert "fairgate_jain_index" in series, "no Jain's index: the fixture's tenants fell short"
    return {name: frozenset(labels | TARGET_LABELS) for name, labels in series.items()}


# ---- PromQL, read just enough ------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_WORD = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: its words that are not functions, aggregations,
    keywords, label names or inside strings, durations or numbers."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _WORD.finditer(text):
        is_call = text[match.end() :].lstrip().startswith("(")
        if not is_call and match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def label_uses(expr: str) -> Iterator[tuple[str, str]]:
    """(metric name, label name) of each label matcher of a selector with a name; ("", label)
    for each label an aggregation or a vector match groups by."""
    for selector in _SELECTOR.finditer(expr):
        for matcher in _MATCHER.finditer(selector.group(2)):
            yield selector.group(1) or "", matcher.group(1)
    for grouping in _GROUPING.finditer(_STRING.sub('""', expr)):
        for label in grouping.group(1).split(","):
            if label.strip():
                yield "", label.strip()


def assert_exposed(expr: str, series: dict[str, frozenset[str]], where: str) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    missing = names - series.keys()
    assert not missing, f"{where}: the gateway exposes no {sorted(missing)} ({expr!r})"
    labels_of_expr = frozenset().union(*(series[name] for name in names))
    for name, label in label_uses(expr):
        labels = series[name] if name else labels_of_expr
        assert label in labels, f"{where}: {name or sorted(names)} has no label {label!r}"


def test_metric_names_are_read_out_of_promql() -> None:
    """The reader the checks below rely on, on the kinds of expression the files use."""
    expr = (
        'sum by (tenant) (rate(a_total{reason=~"x|y", tenant!="b_total"}[5m])) / on (tenant) '
        "group_left b_gauge > 0.5 and count by (job, instance) (c == 1) >= 2 "
        "or histogram_quantile(0.95, sum by (le) (rate(d_bucket[1m] offset 5m))) > 1e3"
    )
    assert metric_names(expr) == {"a_total", "b_gauge", "c", "d_bucket"}
    assert set(label_uses(expr)) == {
        ("a_total", "reason"),
        ("a_total", "tenant"),
        ("", "tenant"),
        ("", "job"),
        ("", "instance"),
        ("", "le"),
    }
    with pytest.raises(AssertionError, match="exposes no"):
        assert_exposed("rate(fairgate_nope_total[5m])", {"x": frozenset()}, "test")
    with pytest.raises(AssertionError, match="has no label 'colour'"):
        assert_exposed('x{colour="red"}', {"x": frozenset({"tenant"})}, "test")


# ---- the alerts and the dashboard against the exposition ---------------------------------------


def test_each_alert_names_only_series_and_labels_the_gateway_exposes(
    gateway_series: dict[str, frozenset[str]],
) -> None:
    for rule in _alert_rules():
        assert_exposed(rule["expr"], gateway_series, rule["alert"])


def test_the_starvation_alert_compares_shares_over_one_window() -> None:
    """The received share is over the gateway's window: it is held to the entitled share over
    that window, not to the one of the moment (which moves as other tenants come and go)."""
    [rule] = [r for r in _alert_rules() if r["alert"] == "FairgateTenantStarved"]
    names = metric_names(rule["expr"])
    assert {"fairgate_tenant_service_share", "fairgate_tenant_entitled_share_window"} <= names
    assert "fairgate_tenant_entitled_share" not in names


def test_the_quota_alert_counts_the_quota_error_codes() -> None:
    """The reasons fairgate_rejections_total has for a tenant over its quotas are the codes of
    ``RateLimited`` and its kinds (``gateway.gatekeeper.outcome_of``), less ``QueueFull``: the
    tenant's own backlog, no quota."""
    kinds: list[type[RateLimited]] = [RateLimited]
    for kind in kinds:
        kinds.extend(kind.__subclasses__())
    codes = {kind.code for kind in kinds if not issubclass(kind, QueueFull)}
    assert QuotaExhausted.code in codes
    [rule] = [r for r in _alert_rules() if r["alert"] == "FairgateQuotaRejectionsSpiking"]
    [reasons] = re.findall(r'reason=~"([^"]*)"', rule["expr"])
    assert set(reasons.split("|")) == codes


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def dashboard_queries() -> dict[str, str]:
    """Each panel target's PromQL by "panel_<id>_<refId>", and each variable's selector by
    "variable_<name>", with Grafana's variables given values PromQL takes: intervals a
    duration, the dashboard's own (all of them regex-matched label values) ".*"."""
    dashboard = _dashboard()
    variables = _variables(dashboard)

    def substituted(expr: str, where: str) -> str:
        expr = re.sub(r"\$__(rate_)?interval\b", "5m", expr)
        for name in variables:
            expr = re.sub(rf'=~"\$(?:{name}\b|\{{{name}\}})"', '=~".*"', expr)
        assert "$" not in expr, f"{where}: a variable the dashboard does not define: {expr!r}"
        return expr

    queries = {}
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            where = f"panel_{panel['id']}_{target['refId']}"
            queries[where] = substituted(target["expr"], where)
    for name, variable in variables.items():
        if variable["type"] == "query":
            definition = variable["definition"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
            assert match, f"variable {name}: {definition!r} is not label_values(selector, label)"
            selector, label = match.groups()
            queries[f"variable_{name}"] = substituted(f"count by ({label}) ({selector})", name)
    return queries


def test_each_dashboard_query_names_only_series_and_labels_the_gateway_exposes(
    gateway_series: dict[str, frozenset[str]],
) -> None:
    for where, expr in dashboard_queries().items():
        assert_exposed(expr, gateway_series, where)


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    """Per tenant: service rate against entitled share, SLO attainment, queue, rejections and
    preemptions; per worker: state, batch, KV, prefix hits; overall: Jain's index, throughput."""
    used = set().union(*(metric_names(expr) for expr in dashboard_queries().values()))
    assert {
        "fairgate_tenant_service_units_total",
        "fairgate_tenant_entitled_share",
        "fairgate_tenant_entitled_share_window",
        "fairgate_tenant_service_share",
        "fairgate_jain_index",
        "fairgate_slo_attainment",
        "fairgate_tpot_attainment",
        "fairgate_tenant_slo_attainment",
        "fairgate_tenant_tpot_attainment",
        "fairgate_tenant_queue_depth",
        "fairgate_model_queue_depth",
        "fairgate_rejections_total",
        "fairgate_preemptions_total",
        "fairgate_backend_worker_state",
        "fairgate_backend_batch_size",
        "fairgate_backend_kv_blocks_used",
        "fairgate_backend_kv_blocks_total",
        "fairgate_backend_prompt_tokens_total",
        "fairgate_backend_cached_tokens_total",
        "fairgate_completion_tokens_total",
    } <= used


def test_the_dashboard_is_importable_json_over_one_prometheus_input() -> None:
    dashboard = _dashboard()
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = _variables(dashboard)
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["tenant"]["type"] == "query"
    panels = _panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels), "panel ids repeat"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == DATASOURCE, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = panel["id"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_each_dashboard_query_has_series_in_a_real_prometheus(
    fed_metrics: GatewayMetrics, tmp_path: Path
) -> None:
    """A real Prometheus scraping the exposition: every panel's query answers with series (a
    name or label the gateway lacks, or a join that matches nothing, answers with none), and
    every alert's expression evaluates."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=fed_metrics.registry)
    try:
        targets = {"gateway": [f"127.0.0.1:{server.server_port}"]}
        with PrometheusServer(require_prometheus(), targets, tmp_path) as prometheus:
            prometheus.wait_for("fairgate_jain_index", timeout_s=30.0)
            # rate() needs two scrapes in its range.
            prometheus.wait_for(
                "count_over_time(fairgate_jain_index[5m]) >= 2", timeout_s=10.0, poll_s=0.5
            )
            empty = [
                f"{where}: {expr}"
                for where, expr in dashboard_queries().items()
                if not prometheus.query(expr)
            ]
            assert not empty, "no series for:\n" + "\n".join(empty)
            for rule in _alert_rules():
                prometheus.query(rule["expr"])  # an error raises
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
