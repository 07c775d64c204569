"""Disaggregated serving orchestrator (BLS): context instance, then generation instance.

`execute` is async, so one instance drives many requests at once; the request path lives in
python_backend_utils/orchestrator.py.
"""

import asyncio
import os
from pathlib import Path

from python_backend_utils.deployment import Deployment
from python_backend_utils.orchestrator import Orchestrator
from python_backend_utils.triton_io import model_parameters
from python_backend_utils.triton_metrics import ORCHESTRATOR_METRICS, GaugeSet

DEPLOYMENT_ENV = "TRITON_DISAGG_DEPLOYMENT"


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(args["model_config"])
        default = Path(__file__).resolve().parent.parent / "disagg_config.yaml"
        path = os.environ.get(DEPLOYMENT_ENV) or parameters.get("deployment_file") or default
        self.orchestrator = Orchestrator(Deployment.load(path), int(parameters.get("context_block_size") or 16))
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.gauges = GaugeSet("disagg_orchestrator", ORCHESTRATOR_METRICS, labels)
        self.routed = {
            target: GaugeSet("disagg_router", {"decisions_total": "requests routed to each instance"},
                             {**labels, "target": str(target)})
            for router in (self.orchestrator.context_router, self.orchestrator.generation_router)
            for target in router.targets
        }

    async def execute(self, requests):
        await asyncio.gather(*(self.orchestrator.serve(request) for request in requests))
        self.gauges.publish(self.orchestrator.stats.as_metrics())
        for router in (self.orchestrator.context_router, self.orchestrator.generation_router):
            for target, count in router.decisions.items():
                self.routed[target].publish({"decisions_total": count})
        return None
