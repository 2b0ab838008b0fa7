"""The Grafana dashboard of the nova_assets jobs, as code: writes ops/grafana/nova_assets.json.

Built with Grafana's own SDK (`grafana-foundation-sdk`, the Grafana 11 build) from the metrics of
docs/design.md §7 and the job registry, so a job added to the registry shows up here. The JSON
in the repository is what this writes: `make dashboard` regenerates it, `--check` (run by
`make lint`) fails when they differ.

    python ops/grafana/dashboard.py [--check]
"""

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as models
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from nova_assets.core.jobs import job_specs
from nova_assets.core.settings import Settings
from nova_assets.defs.metrics.recount import UNHEALTHY_AFTER_FAILURES
from nova_assets.defs.metrics.sensor import PUSH_JOB

OUTPUT = Path(__file__).with_name("nova_assets.json")
UID = "nova-assets"
"""Fixed, so the alerts' `dashboard_url` (/d/nova-assets) finds it in any Grafana."""
CODE_LOCATION = "nova_assets"
DLQ_GROWING_PER_HOUR = 3
"""NovaDLQGrowing's threshold in ops/prometheus/alerts.yml."""

DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every query reads the grouping the code location pushes under (the metric names are generic)
# and the jobs the `job` variable selects.
SELECTOR = '{job="$grouping", job_name=~"$job"}'


def query(expr: str, legend: str = "{{job_name}}", ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)


def per_job(metric: str) -> str:
    """One series per selected job (the Pushgateway's `instance` label dropped)."""
    return f"max by (job_name) ({metric}{SELECTOR})"


def job_runs_link() -> builders.DashboardLink:
    """From a job's series to its runs in the Dagster UI."""
    return (
        builders.DashboardLink("Runs of ${__field.labels.job_name} in Dagster")
        .url(f"${{dagster_url}}/locations/{CODE_LOCATION}/jobs/${{__field.labels.job_name}}/runs")
        .target_blank(True)
    )


def thresholds(*steps: tuple[float | None, str]) -> builders.ThresholdsConfig:
    return (
        builders.ThresholdsConfig()
        .mode(models.ThresholdsMode.ABSOLUTE)
        .steps([models.Threshold(value=value, color=color) for value, color in steps])
    )


def job_panel(title: str, description: str, *targets: prometheus.Dataquery) -> timeseries.Panel:
    """A time series per selected job, each linking to the job's runs in Dagster."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(12)
        .height(8)
        .data_links([job_runs_link()])
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.RIGHT)
            .show_legend(True)
            .calcs(["lastNotNull"])
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def intervals_expr() -> str:
    """Each job's schedule interval as a series labelled with the job (the default settings).

    Prometheus has no metric for it; the alert rules assume the same defaults.
    """
    constants = " or ".join(
        f'label_replace(vector({spec.interval_sec}), "job_name", "{spec.name}", "", "")'
        for spec in job_specs(Settings.from_env({}))
        if spec.interval_sec
    )
    return f"({constants}) and on (job_name) {per_job('job_health')}"


def caches_row(dashboard: builders.Dashboard) -> builders.Dashboard:
    health = (
        stat.Panel()
        .title("Cache health")
        .description(
            "Per job: ok while its failure streak is below "
            f"{UNHEALTHY_AFTER_FAILURES}, failing from then on (NovaJobUnhealthy pages after a "
            "minute). Its Redis cache is refreshed only while the job succeeds."
        )
        .datasource(DATASOURCE)
        .with_target(query(per_job("job_health")).instant())
        .span(12)
        .height(6)
        .mappings(
            [
                models.ValueMap(
                    options={
                        "1": models.ValueMappingResult(text="ok", color="green", index=0),
                        "0": models.ValueMappingResult(text="failing", color="red", index=1),
                    }
                )
            ]
        )
        .thresholds(thresholds((None, "red"), (1, "green")))
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .data_links([job_runs_link()])
    )
    alerts = (
        table.Panel()
        .title("Alerts")
        .description(
            "The rules of ops/prometheus/alerts.yml now pending or firing, with the job each is "
            "about; each rule's runbook is in the README's operations section."
        )
        .datasource(DATASOURCE)
        .with_target(
            query(
                f"max by (alertname, job_name, severity, alertstate) (ALERTS{SELECTOR})",
                legend="{{alertname}} {{job_name}}",
            )
            .instant()
            .format(PromQueryFormat.TABLE)
        )
        .with_transformation(
            models.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True, "Value": True},
                    "indexByName": {"alertname": 0, "job_name": 1, "severity": 2, "alertstate": 3},
                },
            )
        )
        .no_value("No nova_assets alert is pending or firing")
        .span(12)
        .height(6)
    )
    return dashboard.with_row(builders.Row("Caches")).with_panel(health).with_panel(alerts)


def jobs_row(dashboard: builders.Dashboard) -> builders.Dashboard:
    runs = job_panel(
        "Runs per minute by status",
        "Finished runs that count for each job (its own, and UI or replay runs of its asset).",
        query(
            f"sum by (job_name, status) (rate(job_runs_total{SELECTOR}[$__rate_interval])) * 60",
            legend="{{job_name}} {{status}}",
        ),
    ).unit("runs/min")
    duration = job_panel(
        "Duration of the last run",
        "End minus start of each job's newest finished run.",
        query(per_job("job_duration_seconds")),
    ).unit("s")
    since_success = (
        job_panel(
            "Seconds since the last success, against the interval",
            "Solid: seconds since each job's newest success. Dashed: the job's schedule interval "
            "(default settings). `nova-assets health` says late past two intervals; "
            "NovaJobStale warns past three.",
            query(f"time() - {per_job('job_last_success_timestamp')}"),
            query(intervals_expr(), legend="{{job_name}} interval", ref="B"),
        )
        .span(24)
        .unit("s")
        .scale_distribution(
            common_builders.ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(10)
        )
        .override_by_query(
            "B",
            [
                models.DynamicConfigValue(
                    id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}
                )
            ],
        )
    )
    streak = (
        job_panel(
            "Failure streak",
            "Failed runs since each job's newest success; at "
            f"{UNHEALTHY_AFTER_FAILURES} the job is unhealthy (NovaJobUnhealthy).",
            query(per_job("job_consecutive_failures")),
        )
        .min(0)
        .decimals(0)
        .thresholds(thresholds((None, "green"), (UNHEALTHY_AFTER_FAILURES, "red")))
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE)
        )
    )
    items = job_panel(
        "Items processed",
        "`dagster/row_count` of each job's newest success: posts listed, users served, "
        "users warmed.",
        query(per_job("job_items_processed")),
    ).decimals(0)
    dlq_messages = (
        job_panel(
            "DLQ messages in the last hour",
            "Failed runs delivered to the dead-letter topic; NovaDLQGrowing warns at "
            f"{DLQ_GROWING_PER_HOUR} an hour. List them with `nova-assets dlq list --job JOB`.",
            query(f"sum by (job_name) (increase(job_dlq_messages_total{SELECTOR}[1h]))"),
        )
        .min(0)
        .thresholds(thresholds((None, "green"), (DLQ_GROWING_PER_HOUR, "orange")))
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE)
        )
    )
    dlq_pending = (
        job_panel(
            "DLQ pending",
            "Failed runs of the last day not yet delivered to the dead-letter topic (Kafka down, "
            "or undeliverable); NovaDLQPending warns after 10 minutes.",
            query(per_job("job_dlq_pending")),
        )
        .min(0)
        .decimals(0)
    )
    dashboard = dashboard.with_row(builders.Row("Jobs"))
    for panel in (runs, duration, since_success, streak, items, dlq_messages, dlq_pending):
        dashboard = dashboard.with_panel(panel)
    return dashboard


def variables(dashboard: builders.Dashboard) -> builders.Dashboard:
    return (
        dashboard.with_variable(
            builders.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
        )
        .with_variable(
            builders.ConstantVariable("grouping")
            .description("The Pushgateway grouping (`job` label) nova_assets pushes under.")
            .value(PUSH_JOB)
        )
        .with_variable(
            builders.QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query('label_values(job_runs_total{job="$grouping"}, job_name)')
            .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(models.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .current(models.VariableOption(selected=True, text="All", value="$__all"))
        )
        .with_variable(
            builders.TextBoxVariable("dagster_url")
            .label("Dagster UI")
            .description("Where the Dagster UI answers; the links lead there.")
            .default_value("http://127.0.0.1:3000")
        )
    )


def dagster_link(title: str, path: str) -> builders.DashboardLink:
    return (
        builders.DashboardLink(title)
        .type(models.DashboardLinkType.LINK)
        .url(f"${{dagster_url}}{path}")
        .icon("external link")
        .target_blank(True)
    )


def build() -> dict:
    """The dashboard as the JSON model Grafana imports."""
    dashboard = (
        builders.Dashboard("nova_assets jobs")
        .uid(UID)
        .description(
            "The five cache jobs of the nova_assets code location: runs, failures, freshness, "
            "items and the dead-letter queue, from the metrics its job_metrics sensor pushes."
        )
        .tags(["nova", "dagster"])
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .tooltip(models.DashboardCursorSync.CROSSHAIR)
        .links(
            [
                dagster_link("Dagster: runs", "/runs"),
                dagster_link("Dagster: failed runs", "/runs?q%5B0%5D=status%3AFAILURE"),
                dagster_link("Dagster: schedules and sensors", "/automation"),
                dagster_link("Dagster: assets", "/assets"),
            ]
        )
    )
    dashboard = jobs_row(caches_row(variables(dashboard)))
    return json.loads(JSONEncoder(sort_keys=True).encode(dashboard.build()))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help=f"fail when {OUTPUT.name} differs from what is built"
    )
    args = parser.parse_args()
    text = render()
    if not args.check:
        OUTPUT.write_text(text)
        return 0
    if not OUTPUT.exists() or OUTPUT.read_text() != text:
        sys.stderr.write(
            f"{OUTPUT} is not what ops/grafana/dashboard.py writes: run `make dashboard` and "
            "commit the result.\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
