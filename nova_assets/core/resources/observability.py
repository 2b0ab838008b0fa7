"""Where job health goes out: the Pushgateway's metrics and an optional failure webhook."""

import json
import urllib.request
from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster_prometheus import PrometheusResource
from pydantic import Field

from nova_assets.core.resources.base import HTTP_TIMEOUT_S, PUSH_TIMEOUT_S
from nova_assets.core.settings import redact_url


class AlertWebhookResource(dg.ConfigurableResource):
    """Posts a Slack-compatible message for each final failure, when a webhook URL is set."""

    url: str | None = Field(default=None, description="ALERT_WEBHOOK_URL; unset sends nothing.")
    ui_url: str = Field(default="http://127.0.0.1:3000", description="Base URL of the Dagster UI.")
    timeout_s: float = Field(default=HTTP_TIMEOUT_S, description="Seconds before a post gives up.")

    def notify_failure(self, message: Mapping[str, Any]) -> bool:
        """Post one failure; returns whether it was posted. Never raises: alerts are best effort."""
        if not self.url:
            return False
        error = message.get("error") or {}
        run_link = f"{self.ui_url.rstrip('/')}/runs/{message['run_id']}"
        text = (
            f":rotating_light: *{message['job_name']}* failed after "
            f"{message.get('retry_count', 0)} retries — assets {', '.join(message['asset_keys'])}\n"
            f"{error.get('type', 'Error')}: {str(error.get('message', ''))[:500]}\n"
            f"<{run_link}|Open the run>"
        )
        body = json.dumps({"text": text}).encode()
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s):
                return True
        except OSError as exc:
            dg.get_dagster_logger().warning(f"Could not post the failure alert: {exc}")
            return False


class JobMetricsResource(PrometheusResource):
    """dagster-prometheus' resource with a short timeout and pushes that never raise."""

    timeout: int = Field(
        default=PUSH_TIMEOUT_S, description="Seconds before a push to the gateway gives up."
    )

    def push(self, job: str, grouping_key: Mapping[str, str] | None = None) -> bool:
        """Push the registry; on failure log a warning and return False instead of raising."""
        try:
            self.push_to_gateway(job=job, grouping_key=dict(grouping_key or {}))
        except Exception as exc:  # a metrics outage must never fail a run or a sensor
            dg.get_dagster_logger().warning(
                f"Could not push metrics to the Pushgateway at {redact_url(self.gateway)}: {exc}"
            )
            return False
        return True
