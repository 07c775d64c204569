"""deploy/grafana's dashboard reads only metrics the code exports: a renamed metric breaks this, not the board."""

from __future__ import annotations

import json
import re

from openai_frontend.metrics import FrontendMetrics
from python_backend_utils.triton_glue.metric_names import (
    ENGINE_METRICS,
    ORCHESTRATOR_METRICS,
    PARAMS_METRICS,
    ROUTER_METRICS,
    TRANSFER_METRICS,
)
from tests.helpers import REPO_ROOT

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "triton-disagg.json"
# Our metrics' names: vLLM's on the frontend, ours on Triton's port. PromQL's own words never match.
METRIC_NAME = re.compile(r"\b(?:vllm:[a-z0-9_:]+|disagg_[a-z0-9_]+)\b")


def exported_names() -> set[str]:
    frontend = {sample.name for family in FrontendMetrics("m").registry.collect() for sample in family.samples}
    engines = {f"disagg_{name}" for name in {**ENGINE_METRICS, **TRANSFER_METRICS, **PARAMS_METRICS}}
    orchestrator = {f"disagg_orchestrator_{name}" for name in ORCHESTRATOR_METRICS}
    return frontend | engines | orchestrator | set(ROUTER_METRICS)


def test_every_query_of_the_dashboard_reads_metrics_the_code_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs
    exported = exported_names()
    for expr in exprs:
        names = set(METRIC_NAME.findall(expr))
        assert names, f"no metric of ours in {expr!r}"
        assert names <= exported, f"{expr!r} reads {sorted(names - exported)}, which nothing exports"


def test_the_dashboard_shows_vllms_latency_histograms():
    exprs = " ".join(target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"]
                     for target in panel["targets"])
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket"):
        assert name in exprs
