"""The Grafana dashboard of ops/grafana shows real series, and every alert links its runbook.

The committed JSON is what the generator writes. Runs of the five jobs, one of them failing three
times with a run delivered to the DLQ, go through the `job_metrics` sensor's own counting and
push to the real Pushgateway; a real Prometheus (the stack's, with the shipped alert rules,
scraping and evaluating every second rather than every 15 s so the test waits less) scrapes it,
and every panel's PromQL, with the dashboard's variables filled in as Grafana would, is sent to
its HTTP API: each parses and returns the series the panel is meant to show, one per job where
the panel is per job, with the values those runs left. Each rule of ops/prometheus/alerts.yml
links a heading of the README and the dashboard.
"""

import json
import logging
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml

from nova_assets.cli import ALERT_RULES
from nova_assets.core.jobs import job_specs
from nova_assets.core.resources import AlertWebhookResource, JobMetricsResource, KafkaDLQResource
from nova_assets.core.settings import Settings
from nova_assets.defs.dlq.sensors import PublisherCursor, publish_failed_runs
from nova_assets.defs.metrics.sensor import push_values
from nova_assets.defs.metrics.state import MetricsState, advance
from nova_assets.local.stack import StackConfig, down, up
from nova_assets_tests.conftest import free_ports

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "ops" / "grafana" / "dashboard.py"
DASHBOARD = ROOT / "ops" / "grafana" / "nova_assets.json"
README = ROOT / "README.md"

SPECS = job_specs(Settings.from_env({}))
NAMES = [spec.name for spec in SPECS]
FAILING = "cache_warmer"
ITEMS = {name: 10 * (n + 1) for n, name in enumerate(NAMES)}
"""The `dagster/row_count` each job's successful runs report."""
RATE_INTERVAL = "1m"
"""Grafana's `$__rate_interval` for the stack's 15 s scrape interval: four scrapes. Kept with the
test's 1 s scrapes: the window then holds the samples of both pushes (a rate needs two)."""
INTERVAL = "1s"
"""How often the test's Prometheus scrapes and evaluates its rules (the stack's 15 s would leave
the test waiting up to 45 s for the two scrapes and the evaluation it needs)."""
SCRAPE_TIMEOUT_S = 120.0
"""Far more than a scrape and a rule evaluation (a second each), for a busy machine."""

log = logging.getLogger(__name__)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_committed_json_is_what_the_generator_writes():
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# -- runbooks ----------------------------------------------------------------------------------


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings (fenced code left out)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r" {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_alert_links(readme: str, rules: dict, board: dict) -> list[str]:
    """What is wrong with each rule's `runbook_url` and `dashboard_url`, if anything."""
    anchors = heading_anchors(readme)
    variables = {variable["name"] for variable in board["templating"]["list"]}
    problems = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            name, annotations = rule["alert"], rule.get("annotations", {})
            runbook = annotations.get("runbook_url", "")
            page, _, anchor = runbook.partition("#")
            if page != "README.md" or anchor not in anchors:
                problems.append(f"{name}: runbook_url {runbook!r} names no heading of README.md")
            url = urllib.parse.urlsplit(annotations.get("dashboard_url", ""))
            params = {key.removeprefix("var-") for key in urllib.parse.parse_qs(url.query)}
            if url.path != f"/d/{board['uid']}" or not params <= variables or not params:
                problems.append(
                    f"{name}: dashboard_url {annotations.get('dashboard_url')!r} does not open "
                    f"the dashboard /d/{board['uid']} on one of its variables"
                )
    return problems


def test_every_alert_links_its_runbook_in_the_readme_and_the_dashboard():
    rules = yaml.safe_load(ALERT_RULES.read_text())
    assert broken_alert_links(README.read_text(), rules, dashboard()) == []


def test_a_missing_runbook_heading_is_reported():
    rules = yaml.safe_load(ALERT_RULES.read_text())
    readme = "# Operations\n\n### NovaJobUnhealthy\n\n```\n### NovaJobStale\n```\n"
    problems = broken_alert_links(readme, rules, dashboard())
    assert [p.split(":")[0] for p in problems] == [
        "NovaJobStale",
        "NovaDLQGrowing",
        "NovaDLQPending",
    ]


# -- every panel's queries against a real Prometheus ------------------------------------------


def stand_in(name: str, asset: str, outcomes: list[bool]) -> dg.JobDefinition:
    """A job named like ours whose runs succeed or fail as `outcomes` says, in order."""

    @dg.asset(name=asset)
    def cache() -> dg.MaterializeResult:
        if not outcomes.pop(0):
            raise ConnectionError("Redis refused the connection")
        return dg.MaterializeResult(metadata={"dagster/row_count": ITEMS[name]})

    job = dg.define_asset_job(name, selection=[cache])
    return dg.Definitions(assets=[cache], jobs=[job]).resolve_job_def(name)


def run(instance: dg.DagsterInstance, name: str, *outcomes: bool) -> None:
    asset = next(spec.asset for spec in SPECS if spec.name == name)
    job = stand_in(name, asset, list(outcomes))
    for _ in outcomes:
        job.execute_in_process(instance=instance, raise_on_error=False)


class Prometheus:
    """The HTTP API of a Prometheus of the test's own."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        body = self._get("/api/v1/query", params)
        assert body["data"]["resultType"] == "vector", (expr, body)
        return body["data"]["result"]

    def global_config(self) -> dict[str, str]:
        """The `global` section of the configuration it has loaded."""
        return yaml.safe_load(self._get("/api/v1/status/config", {})["data"]["yaml"])["global"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", {"match[]": match})["data"]

    def _get(self, path: str, params: dict[str, str]) -> dict:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            # Prometheus answers a query it cannot parse with 400 and says why.
            raise AssertionError(f"{params}: {exc.read().decode()}") from exc
        assert body["status"] == "success", body
        return body


@pytest.fixture
def prometheus(tmp_path: Path, pushgateway: str, service_binaries: None) -> Iterator[Prometheus]:
    """The stack's Prometheus on a free port, with our rules, scraping every `INTERVAL`."""
    [port] = free_ports(1)
    config = StackConfig(
        state_dir=tmp_path / ".nova",
        pushgateway_port=urllib.parse.urlsplit(pushgateway).port,
        prometheus_port=port,
        prometheus_rules=ALERT_RULES,
        prometheus_interval=INTERVAL,
    )
    up(config, services=("prometheus",))
    try:
        server = Prometheus(f"http://127.0.0.1:{port}")
        # The waits below are sized for this interval: prometheus.yml must carry it.
        loaded = server.global_config()
        assert [loaded["scrape_interval"], loaded["evaluation_interval"]] == [INTERVAL] * 2, loaded
        yield server
    finally:
        down(config, services=("prometheus",))


@pytest.fixture
def grouping(pushgateway: str) -> Iterator[str]:
    """A Pushgateway grouping of the test's own, deleted afterwards."""
    name = f"nova_assets_dashboard_{uuid.uuid4().hex[:8]}"
    yield name
    request = urllib.request.Request(f"{pushgateway}/metrics/job/{name}", method="DELETE")
    urllib.request.urlopen(request, timeout=5)


def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while not check():
        assert time.monotonic() < deadline, f"Prometheus did not show {what} in time"
        time.sleep(0.5)


def by_job(result: list[dict]) -> dict[str, float]:
    """One value per job; fails if a job has two series."""
    values = {series["metric"]["job_name"]: float(series["value"][1]) for series in result}
    assert len(values) == len(result), result
    return values


def shown(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def fill_in(expr: str, grouping: str) -> str:
    """The PromQL Grafana sends: every variable replaced, `job` set to All (a regex of all)."""
    values = {"grouping": grouping, "job": f"({'|'.join(NAMES)})", "__rate_interval": RATE_INTERVAL}
    return re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: values[m.group(1) or m.group(2)], expr)


def expected_values(
    started: float, at: float
) -> dict[tuple[str, str], Callable[[list[dict]], None]]:
    """What each panel's query (by title and refId) shows after the runs of the test."""
    zeros = {name: 0.0 for name in NAMES}

    def per_job(expected: dict[str, float]) -> Callable[[list[dict]], None]:
        def check(result: list[dict]) -> None:
            assert by_job(result) == pytest.approx(expected)

        return check

    def health(result: list[dict]) -> None:
        assert by_job(result) == {name: 0.0 if name == FAILING else 1.0 for name in NAMES}

    def alerts(result: list[dict]) -> None:
        assert {(s["metric"]["alertname"], s["metric"]["job_name"]) for s in result} == {
            ("NovaJobUnhealthy", FAILING),
            ("NovaDLQPending", FAILING),
        }

    def runs_per_minute(result: list[dict]) -> None:
        rates = {
            (s["metric"]["job_name"], s["metric"]["status"]): float(s["value"][1]) for s in result
        }
        assert set(rates) == {(name, status) for name in NAMES for status in ("success", "failure")}
        # Between the two scrapes trending_1h succeeded once more and the failing job failed twice.
        assert rates["trending_1h", "success"] > 0
        assert rates[FAILING, "failure"] > 0
        assert rates["trending_24h", "success"] == rates["trending_24h", "failure"] == 0

    def durations(result: list[dict]) -> None:
        values = by_job(result)
        assert set(values) == set(NAMES)
        assert all(0 < value < 60 for value in values.values()), values

    def since_success(result: list[dict]) -> None:
        values = by_job(result)
        assert set(values) == set(NAMES)
        assert all(0 <= value < at - started for value in values.values()), values

    def dlq_last_hour(result: list[dict]) -> None:
        values = by_job(result)
        assert set(values) == set(NAMES)
        assert values.pop(FAILING) > 0
        assert set(values.values()) == {0.0}

    return {
        ("Cache health", "A"): health,
        ("Alerts", "A"): alerts,
        ("Runs per minute by status", "A"): runs_per_minute,
        ("Duration of the last run", "A"): durations,
        ("Seconds since the last success, against the interval", "A"): since_success,
        ("Seconds since the last success, against the interval", "B"): per_job(
            {spec.name: spec.interval_sec for spec in SPECS}
        ),
        ("Failure streak", "A"): per_job({**zeros, FAILING: 3}),
        ("Items processed", "A"): per_job(ITEMS),
        ("DLQ messages in the last hour", "A"): dlq_last_hour,
        ("DLQ pending", "A"): per_job({**zeros, FAILING: 2}),
    }


def test_every_panel_query_returns_its_series_from_a_real_prometheus(
    prometheus: Prometheus, pushgateway: str, grouping: str, kafka_dlq: KafkaDLQResource
):
    started = time.time()
    gateway = JobMetricsResource(gateway=pushgateway)
    gateway.setup_for_execution(None)

    def scraped(expr: str, expected: float) -> Callable[[], bool]:
        return lambda: [float(s["value"][1]) for s in prometheus.query(expr)] == [expected]

    def failures_of(job: str) -> str:
        return f'job_runs_total{{job="{grouping}", job_name="{job}", status="failure"}}'

    with dg.instance_for_test() as instance:
        # First scrape: every job succeeded once, the failing one failed once after.
        for name in NAMES:
            run(instance, name, True)
        run(instance, FAILING, False)
        state = advance(instance, MetricsState(), SPECS)
        assert push_values(state.values(NAMES), gateway, grouping)
        wait_until(scraped(failures_of(FAILING), 1), "the first push")

        # Second scrape: trending_1h succeeds again, the failure reaches the DLQ and two more
        # failures follow, waiting for it.
        run(instance, "trending_1h", True)
        _, delivered, _ = publish_failed_runs(
            instance,
            PublisherCursor(),
            kafka_dlq,
            AlertWebhookResource(),
            dg.get_dagster_logger(),
            specs=SPECS,
        )
        assert delivered == 1
        run(instance, FAILING, False, False)
        state = advance(instance, state, SPECS)
        assert push_values(state.values(NAMES), gateway, grouping)
    wait_until(scraped(failures_of(FAILING), 3), "the second push")
    wait_until(
        lambda: (
            {s["metric"]["alertname"] for s in prometheus.query(f'ALERTS{{job="{grouping}"}}')}
            == {"NovaJobUnhealthy", "NovaDLQPending"}
        ),
        "the alert rules evaluated on the second push",
    )
    at = time.time()

    board = dashboard()
    # The `job` variable's query lists the five jobs.
    [job_query] = [v["query"] for v in board["templating"]["list"] if v["name"] == "job"]
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", fill_in(job_query, grouping))
    assert match, job_query
    assert sorted(prometheus.label_values(match.group(2), match.group(1))) == sorted(NAMES)
    checks = expected_values(started, at)
    seen = set()
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            key = (panel["title"], target["refId"])
            expr = fill_in(target["expr"], grouping)
            result = prometheus.query(expr, at)
            log.info(
                "%s [%s]: %s -> %s",
                *key,
                target["expr"],
                "; ".join(sorted(f"{shown(s['metric'])}: {s['value'][1]}" for s in result)),
            )
            assert result, f"{key}: {expr} returned nothing"
            checks[key](result)
            seen.add(key)
    assert seen == set(checks)
