"""Routing policies and the deployment file."""

from __future__ import annotations

import pytest

from python_backend_utils.orchestration.deployment import Deployment, DeploymentError, RouterConfig
from python_backend_utils.orchestration.routing import (
    KvCacheAwareRouter,
    LoadBalancingRouter,
    NoWorkerError,
    Router,
    Worker,
    make_router,
)

TARGETS = [Worker("context", 1), Worker("context", 2), Worker("context", 3)]


def test_round_robin_cycles_and_skips_excluded():
    router = Router(TARGETS, RouterConfig("round_robin"))
    assert [router.choose([1]) for _ in range(4)] == [TARGETS[0], TARGETS[1], TARGETS[2], TARGETS[0]]
    picks = {router.choose([1], exclude=frozenset({TARGETS[1]})) for _ in range(6)}
    assert picks == {TARGETS[0], TARGETS[2]}
    with pytest.raises(NoWorkerError):
        router.choose([1], exclude=frozenset(TARGETS))


@pytest.mark.parametrize("metric", ["requests", "tokens"])
def test_load_balancing_picks_the_least_loaded(metric):
    router = LoadBalancingRouter(TARGETS, RouterConfig("load_balancing", load_metric=metric))
    router.started(TARGETS[0], 100)
    router.started(TARGETS[1], 10)
    router.started(TARGETS[1], 10)
    expected = TARGETS[2]
    assert router.choose([1]) == expected
    router.started(TARGETS[2], 500)
    router.started(TARGETS[2], 500)
    assert router.choose([1]) == (TARGETS[0] if metric == "requests" else TARGETS[1])
    router.finished(TARGETS[2], 500)
    router.finished(TARGETS[2], 500)
    assert router.choose([1]) == TARGETS[2]


def test_kv_cache_aware_follows_the_prefix_and_weighs_load():
    router = KvCacheAwareRouter(TARGETS, RouterConfig("kv_cache_aware"), block_size=4)
    system_prompt = list(range(100, 132))  # 8 blocks
    first = router.choose(system_prompt + [1, 2, 3, 4, 5])
    for suffix in ([6, 7, 8, 9], [10, 11, 12, 13, 14, 15]):
        assert router.choose(system_prompt + suffix) == first
    router.started(first, 1000)  # far more queued work than the 32 cached tokens save
    assert router.choose(system_prompt + [99]) != first


def test_kv_cache_aware_forgets_beyond_capacity():
    router = KvCacheAwareRouter(TARGETS[:1], RouterConfig("kv_cache_aware"), block_size=4, capacity_blocks=2)
    router.choose(list(range(12)))
    assert len(router._cached[TARGETS[0]]) == 2


def test_make_router_maps_types():
    assert type(make_router(TARGETS, RouterConfig("load_balancing"))) is LoadBalancingRouter
    assert type(make_router(TARGETS, RouterConfig("kv_cache_aware"))) is KvCacheAwareRouter
    assert type(make_router(TARGETS, RouterConfig("round_robin"))) is Router


def test_deployment_file_like_the_seed(tmp_path):
    path = tmp_path / "disagg_config.yaml"
    path.write_text(
        "hostname: localhost\nport: 8000\n"
        "context_servers:\n  num_instances: 2\n  router:\n    type: kv_cache_aware\n"
        "generation_servers:\n  num_instances: 1\n  router:\n    type: load_balancing\n    load_metric: requests\n"
        "min_disaggregated_prompt_tokens: 32\n"
    )
    deployment = Deployment.load(path)
    assert deployment.context_servers.num_instances == 2
    assert deployment.context_servers.router.type == "kv_cache_aware"
    assert deployment.generation_servers.router.load_metric == "requests"
    assert deployment.min_disaggregated_prompt_tokens == 32


@pytest.mark.parametrize(
    "raw, complaint",
    [
        ({"context_servers": {"router": {"type": "random"}}}, "router.type"),
        ({"context_servers": {"num_instances": 0}}, "num_instances"),
        ({"generation_servers": {"routr": {}}}, "unknown keys"),
        ({"context_servers": {"router": {"metric": "x"}}}, "router"),
        ({"contxt_servers": {}}, "unknown keys"),
    ],
)
def test_deployment_errors_name_the_key(raw, complaint):
    with pytest.raises(DeploymentError, match=complaint):
        Deployment.from_dict(raw)
