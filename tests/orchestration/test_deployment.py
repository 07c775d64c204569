"""The deployment file's remote instances, its validation, and membership changes (no server needed)."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from python_backend_utils.orchestration.deployment import Deployment, DeploymentError, RemoteAddress, parse_url
from python_backend_utils.orchestration.membership import (
    DeploymentWatcher,
    HealthTracker,
    MembershipMonitor,
    diff_workers,
    group_workers,
)
from python_backend_utils.orchestration.remote import ClientError, WorkerFailed, WorkerUnreachable, classify
from python_backend_utils.orchestration.routing import LoadBalancingRouter, NoWorkerError, Router, Worker, make_router

SCALE_OUT = """\
context_servers:
  num_instances: 0
  urls: ["ctx-host-0:8001", "ctx-host-1:8001/2"]
  router: {type: kv_cache_aware}
generation_servers:
  urls: ["gen-host-0:8001"]
  router: {type: load_balancing}
health_check_interval_s: 3
"""


def test_urls_become_remote_workers_after_the_local_versions():
    deployment = Deployment.from_text(SCALE_OUT)
    assert group_workers(deployment.context_servers) == [
        Worker("context", 1, "ctx-host-0:8001"),
        Worker("context", 2, "ctx-host-1:8001"),
    ]
    # urls without num_instances: every generation instance is remote
    assert deployment.generation_servers.num_instances == 0
    assert group_workers(deployment.generation_servers) == [Worker("generation", 1, "gen-host-0:8001")]
    assert deployment.health_check_interval_s == 3
    mixed = Deployment.from_dict({"generation_servers": {"num_instances": 2, "urls": ["10.0.0.7:9001"]}})
    assert [str(t) for t in group_workers(mixed.generation_servers)] == [
        "generation/1", "generation/2", "generation/1@10.0.0.7:9001"]


@pytest.mark.parametrize(
    "url, address",
    [
        ("localhost:8001", RemoteAddress("localhost:8001", 1)),
        ("gen-0.gen.default.svc.cluster.local:8001/3", RemoteAddress("gen-0.gen.default.svc.cluster.local:8001", 3)),
        ("127.0.0.1:1", RemoteAddress("127.0.0.1:1", 1)),
        ("[::1]:8001", RemoteAddress("[::1]:8001", 1)),
    ],
)
def test_well_formed_urls(url, address):
    assert parse_url(url, "x") == address


@pytest.mark.parametrize(
    "raw, complaint",
    [
        ({"context_servers": {"num_instances": 0}}, r"context_servers: no instance; set num_instances"),
        ({"generation_servers": {"num_instances": 0, "urls": []}}, r"generation_servers: no instance"),
        ({"context_servers": {"urls": ["ctx-host-0"]}}, r"context_servers.urls: 'ctx-host-0' is not host:port"),
        ({"context_servers": {"urls": ["http://ctx:8001"]}}, r"is not host:port"),
        ({"context_servers": {"urls": ["ctx:8001:9"]}}, r"is not host:port"),
        ({"context_servers": {"urls": ["ctx:70000"]}}, r"port 70000, outside 1-65535"),
        ({"context_servers": {"urls": ["ctx:8001/0"]}}, r"versions start at 1"),
        ({"context_servers": {"urls": [8001]}}, r"8001 is not a string"),
        ({"context_servers": {"urls": "ctx:8001"}}, r"urls must be a list"),
        ({"context_servers": {"urls": ["a:1", "a:1/1"]}}, r"lists the same instance twice"),
        ({"context_servers": {"num_instances": -1, "urls": ["a:1"]}}, r"num_instances must be 0 or more"),
        ({"context_servers": {"num_instances": "two"}}, r"num_instances='two' is not a number"),
        ({"context_servers": []}, r"context_servers must be a mapping"),
        ({"health_check_interval_s": 0}, r"health_check_interval_s must be above 0"),
        ({"health_check_failures": 0}, r"health_check_failures must be at least 1"),
        ({"watch_interval_s": "soon"}, r"watch_interval_s='soon' is not a number"),
        ({"context_timeout_s": -1}, r"context_timeout_s must be above 0"),
    ],
)
def test_deployment_errors_say_what_to_fix(raw, complaint):
    with pytest.raises(DeploymentError, match=complaint):
        Deployment.from_dict(raw)


def test_a_file_that_is_not_a_mapping_is_a_deployment_error():
    with pytest.raises(DeploymentError, match="not valid YAML"):
        Deployment.from_text("context_servers: [unclosed")
    with pytest.raises(DeploymentError, match="must be a mapping of keys"):
        Deployment.from_text("- a\n- b\n")


def test_membership_diff():
    a, b, c = Worker("generation", 1), Worker("generation", 1, "h:1"), Worker("generation", 1, "h:2")
    change = diff_workers([a, b], [b, c])
    assert change.added == (c,) and change.removed == (a,)
    assert not diff_workers([a, b], [b, a])


def test_added_workers_take_requests_and_removed_ones_drain():
    old, new = Worker("generation", 1, "g0:1"), Worker("generation", 1, "g1:1")
    router = LoadBalancingRouter([old], Deployment().generation_servers.router)
    router.started(old, 10)  # in flight on the worker about to leave
    router.set_workers([old, new])
    assert router.choose([1]) == new  # the new one is idle: it takes the next request
    router.set_workers([new])
    assert router.draining == [old]
    assert {router.choose([1]) for _ in range(5)} == {new}  # no new request reaches the removed one
    assert router.snapshot()[old] == (False, True, 1, 0)
    router.finished(old, 10)  # its last request ends: gone
    assert router.draining == [] and old not in router.snapshot()


def test_unhealthy_workers_leave_rotation_unless_nothing_else_is_left():
    a, b = Worker("context", 1, "a:1"), Worker("context", 1, "b:1")
    router = Router([a, b], Deployment().context_servers.router)
    router.set_healthy(a, False)
    assert {router.choose([1]) for _ in range(4)} == {b}
    router.set_healthy(b, False)
    with pytest.raises(NoWorkerError, match="unhealthy"):
        router.choose([1])
    assert router.choose([1], allow_unhealthy=True) in (a, b)
    router.set_healthy(a, True)
    assert {router.choose([1]) for _ in range(4)} == {a}


def test_a_policy_change_keeps_the_load_of_requests_in_flight():
    a, b = Worker("context", 1), Worker("context", 2)
    old = make_router([a, b], Deployment().context_servers.router)
    old.started(a, 100)
    new = make_router([a, b], Deployment.from_dict({"context_servers": {"router": {"type": "load_balancing"}}})
                      .context_servers.router)
    new.adopt(old)
    assert new.choose([1]) == b  # a still runs the old router's request
    new.finished(a, 100)
    assert new.snapshot()[a][2] == 0


def test_health_flips_after_consecutive_failures_and_back_on_one_success():
    worker = Worker("context", 1, "a:1")
    health = HealthTracker(failures_to_fail=2)
    assert health.record(worker, False) is None
    assert health.record(worker, False) is False
    assert health.record(worker, False) is None
    assert health.record(worker, True) is True
    assert health.unreachable(worker) is True  # a failed request counts at once
    assert health.unreachable(worker) is False
    health.keep_only([])
    assert health.unhealthy == set()


def test_watcher_applies_valid_edits_and_keeps_the_last_good_one(tmp_path):
    path = tmp_path / "deployment.yaml"
    path.write_text(SCALE_OUT)
    watcher = DeploymentWatcher(path, Deployment.load(path))
    assert watcher.poll() is None

    def edit(text: str) -> None:
        path.write_text(text)
        stamp = time.time() + 1 + len(text) % 7  # a distinct mtime even on a coarse clock
        os.utime(path, (stamp, stamp))

    edit(SCALE_OUT.replace('["gen-host-0:8001"]', '["gen-host-0:8001", "gen-host-1:8001"]'))
    changed = watcher.poll()
    assert changed is not None and len(changed.generation_servers.urls) == 2
    edit("context_servers: {urls: [nonsense]}\n")
    assert watcher.poll() is None  # logged, ignored
    assert watcher.current is changed
    edit(SCALE_OUT)
    assert watcher.poll() == Deployment.from_text(SCALE_OUT)


class FakeServer:
    """Stands in for a tritonserver's health endpoints (the real ones are exercised in
    tests/integration/test_scale_out.py); `ready` is what it answers."""

    def __init__(self) -> None:
        self.ready = True

    def is_server_ready(self, client_timeout=None) -> bool:
        if not self.ready:
            raise ConnectionError("connection refused")
        return True

    def is_model_ready(self, name, version, client_timeout=None) -> bool:
        return self.ready

    def close(self) -> None:
        pass


def test_monitor_takes_a_dead_server_out_and_puts_it_back(tmp_path):
    deployment = Deployment.from_text(SCALE_OUT + "health_check_failures: 1\n")
    servers = {"ctx-host-0:8001": FakeServer(), "ctx-host-1:8001": FakeServer(), "gen-host-0:8001": FakeServer()}
    routers = {group.model_name: make_router(group_workers(group), group.router)
               for group in (deployment.context_servers, deployment.generation_servers)}
    events = []

    def on_health(worker, healthy):
        events.append((str(worker), healthy))
        routers[worker.model_name].set_healthy(worker, healthy)

    monitor = MembershipMonitor(
        deployment, None,
        remote_workers=lambda: [t for r in routers.values() for t in r.snapshot() if t.url],
        on_deployment=lambda d: None, on_health=on_health, on_tick=lambda: None,
        client_factory=servers.__getitem__,
    )
    monitor.check_health()
    assert events == []
    servers["ctx-host-0:8001"].ready = False
    monitor.check_health()
    assert events == [("context/1@ctx-host-0:8001", False)]
    assert {routers["context"].choose([1]) for _ in range(4)} == {Worker("context", 2, "ctx-host-1:8001")}
    servers["ctx-host-0:8001"].ready = True
    monitor.check_health()
    assert events[-1] == ("context/1@ctx-host-0:8001", True)
    monitor.unreachable(Worker("generation", 1, "gen-host-0:8001"))
    assert events[-1] == ("generation/1@gen-host-0:8001", False)
    monitor.stop()


@pytest.mark.parametrize(
    "code, kind",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, ClientError),
        (grpc.StatusCode.UNAVAILABLE, WorkerUnreachable),
        (grpc.StatusCode.INTERNAL, WorkerFailed),
        (grpc.StatusCode.CANCELLED, WorkerFailed),
    ],
)
def test_remote_errors_keep_the_clients_fault_apart(code, kind):
    error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="max_tokens must be at least 1")
    failure = classify(error, "generation/1@h:1")
    assert type(failure) is kind
    assert "max_tokens must be at least 1" in str(failure)
