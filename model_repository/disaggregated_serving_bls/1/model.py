"""Disaggregated serving orchestrator (BLS): context instance, then generation instance.

`execute` is async, so one instance drives many requests at once; the request path lives in
python_backend_utils/orchestration/orchestrator.py. A background thread (membership.py) follows edits of the
deployment file and the health of remote instances, and adds or removes this server's own
instances when the file's counts change (local_workers.py). An instance on this server whose
stub died is reloaded (stub_recovery.py).
"""

import asyncio
import os
import threading
from pathlib import Path

import triton_python_backend_utils as pb_utils

from python_backend_utils.environment import DEPLOYMENT_ENV
from python_backend_utils.orchestration.admission import parse_limit
from python_backend_utils.orchestration.deployment import Deployment
from python_backend_utils.orchestration.local_workers import LocalWorkers
from python_backend_utils.orchestration.membership import MembershipMonitor
from python_backend_utils.orchestration.orchestrator import DEFAULT_MAX_REQUESTS_IN_FLIGHT, GROUPS, Orchestrator
from python_backend_utils.orchestration.routing import Worker
from python_backend_utils.triton_glue.detailed_metrics import detailed_metrics, published
from python_backend_utils.triton_glue.io import model_parameters
from python_backend_utils.triton_glue.metric_names import ORCHESTRATOR_METRICS, ROUTER_METRICS
from python_backend_utils.triton_glue.metrics import LabelledMetrics, MetricSet
from python_backend_utils.triton_glue.server_watch import exit_with_server
from python_backend_utils.triton_glue.stub_recovery import StubRecovery, StubWatch


class TritonPythonModel:
    def initialize(self, args):
        exit_with_server()
        parameters = model_parameters(args["model_config"])
        default = Path(__file__).resolve().parent.parent / "disagg_config.yaml"
        path = os.environ.get(DEPLOYMENT_ENV) or parameters.get("deployment_file") or default
        deployment = Deployment.load(path)
        limit = parse_limit(parameters.get("max_requests_in_flight", ""), DEFAULT_MAX_REQUESTS_IN_FLIGHT)
        self.orchestrator = Orchestrator(deployment, int(parameters.get("context_block_size") or 16), self, limit)
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.gauges = MetricSet("disagg_orchestrator", ORCHESTRATOR_METRICS, labels)
        self.router_gauges = {name: LabelledMetrics(name, description, labels) for name, description
                              in published(ROUTER_METRICS, detailed_metrics(parameters)).items()}
        self._published: set[tuple[str, str]] = set()
        self._publish_lock = threading.Lock()
        self.repository = Path(args["model_repository"]).parent
        self.instances = LocalWorkers(self.repository, deployment, lambda name: pb_utils.load_model(model_name=name))
        self.monitor = MembershipMonitor(
            deployment, path, self.orchestrator.remote_workers,
            lambda new: self.orchestrator.apply(self.instances.grow(new)),
            self.orchestrator.set_health, self._tick)
        self.recovery = StubRecovery(
            self.repository,
            load_model=lambda name: pb_utils.load_model(model_name=name),
            on_reloaded=self._reloaded,
        )
        self.stubs = StubWatch(self.repository)
        self._publish_membership()
        self.monitor.start()

    async def execute(self, requests):
        await asyncio.gather(*(self.orchestrator.serve(request) for request in requests))
        self.gauges.publish({**self.orchestrator.metrics(), "stub_reloads_total": self.recovery.reloads})
        self._publish_membership()
        return None

    def _tick(self) -> None:
        """Each membership round: unload drained instances, and publish the counters, so that
        arrivals show while their requests run (the live planner reads them)."""
        self.instances.retire_idle(self.orchestrator.holds_requests)
        self.gauges.publish({**self.orchestrator.stats.as_metrics(), "stub_reloads_total": self.recovery.reloads})
        self._publish_membership()

    # The orchestrator's InstanceWatch: what its requests find out about instances.
    def unreachable(self, worker: Worker) -> None:
        self.monitor.unreachable(worker)

    def stub_running(self, worker: Worker) -> bool:
        return self.stubs.running(worker.model_name, worker.version)

    def stub_died(self, worker: Worker) -> None:
        """Out of rotation until reloaded; a death already being repaired is not repaired twice."""
        if self.recovery.stub_died(worker.model_name, worker.version):
            self.orchestrator.set_health(worker, False)  # published when `execute` returns

    def _reloaded(self, model_name: str, version: int) -> None:
        self.orchestrator.stub_replaced(Worker(model_name, version))
        self.orchestrator.set_health(Worker(model_name, version), True)
        self._publish_membership()

    def finalize(self):
        self.monitor.stop()

    def _publish_membership(self) -> None:
        """Every worker each router knows (in rotation or draining); removed ones drop to 0."""
        with self._publish_lock:
            seen = set()
            for group in GROUPS:
                snapshot = self.orchestrator.routers[group].snapshot()
                for worker, (member, healthy, in_flight, decisions) in snapshot.items():
                    key = (group, str(worker))
                    seen.add(key)
                    self._set_worker(key, member and healthy, member and not healthy)
                    self.router_gauges["disagg_router_in_flight"].set({"group": group, "worker": key[1]}, in_flight)
                    if "disagg_router_decisions_total" in self.router_gauges:  # only with detailed_metrics
                        self.router_gauges["disagg_router_decisions_total"].set({"group": group, "worker": key[1]},
                                                                                decisions)
            for key in self._published - seen:
                self._set_worker(key, False, False)
                self.router_gauges["disagg_router_in_flight"].set({"group": key[0], "worker": key[1]}, 0)
            self._published = seen

    def _set_worker(self, key: tuple[str, str], healthy: bool, unhealthy: bool) -> None:
        group, worker = key
        gauges = self.router_gauges["disagg_router_workers"]
        gauges.set({"group": group, "worker": worker, "healthy": "true"}, healthy)
        gauges.set({"group": group, "worker": worker, "healthy": "false"}, unhealthy)
