"""The Pushgateway the jobs push their metrics to, and a Prometheus to watch the alerts locally."""

from nova_assets.local.stack.config import HOST, StackConfig


def prepare_pushgateway(config: StackConfig) -> list[str]:
    """A Pushgateway that keeps its metrics in memory only."""
    # Memory only: Debian's build defaults --persistence.file to a path shared by every
    # gateway on the machine, so it is cleared explicitly. Our metrics are recomputed from
    # durable state at each push, never read back from the gateway.
    return [
        "prometheus-pushgateway",
        f"--web.listen-address={HOST}:{config.pushgateway_port}",
        "--persistence.file=",
    ]


def prepare_prometheus(config: StackConfig) -> list[str]:
    """A Prometheus scraping the local Pushgateway and evaluating the project's alert rules."""
    prometheus_dir = config.state_dir / "prometheus"
    prometheus_dir.mkdir(parents=True, exist_ok=True)
    rules = [str(config.prometheus_rules)] if config.prometheus_rules else []
    settings = prometheus_dir / "prometheus.yml"
    interval = config.prometheus_interval
    settings.write_text(
        f"global: {{scrape_interval: {interval}, evaluation_interval: {interval}}}\n"
        f"rule_files: {rules}\n"
        "scrape_configs:\n"
        "  - job_name: pushgateway\n"
        "    honor_labels: true\n"
        f"    static_configs: [{{targets: ['{HOST}:{config.pushgateway_port}']}}]\n"
    )
    return [
        "prometheus",
        f"--config.file={settings}",
        f"--storage.tsdb.path={prometheus_dir / 'data'}",
        f"--web.listen-address={HOST}:{config.prometheus_port}",
    ]
