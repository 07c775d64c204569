"""Scale-out on one machine: the orchestrator, the context server and the generation servers are
separate tritonserver processes on loopback, joined only by their gRPC endpoints in the
orchestrator's deployment file (`urls`), the way they would be on separate hosts.

The KV goes between the processes over UCX (TCP here): shared-memory reads are switched off on
both sides, as they would be across hosts. The reference answers come from the session server's
aggregated path (same model, same fp32 KV, greedy).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launcher import TritonServer
from launcher.cli import MODES
from launcher.ports import free_server_ports
from launcher.repository import set_parameter
from launcher.server import DEFAULT_MODEL_REPOSITORY
from tests.helpers import PROMPTS, crash_lines, generate, holds_work, metric_values, wait_until

pytestmark = pytest.mark.integration

HEALTH_CHECK_INTERVAL_S = 0.5


def deployment_text(context_urls: list[str], generation_urls: list[str]) -> str:
    return (
        f"context_servers:\n  urls: {context_urls}\n  router: {{type: kv_cache_aware}}\n"
        f"generation_servers:\n  urls: {generation_urls}\n  router: {{type: load_balancing, load_metric: requests}}\n"
        "context_timeout_s: 20\n"
        f"health_check_interval_s: {HEALTH_CHECK_INTERVAL_S}\nhealth_check_timeout_s: 2\nhealth_check_failures: 2\n"
        "watch_interval_s: 0.2\n"
    )


def rewrite(path: Path, text: str) -> None:
    """Replace the watched file in one step, as an editor or a ConfigMap update does."""
    partial = path.with_suffix(".new")
    partial.write_text(text)
    os.replace(partial, path)


class Cluster:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.repository = work / "model_repository"
        self.deployment = work / "deployment.yaml"
        self.servers: dict[str, TritonServer] = {}

    def server(self, name: str, models: list[str]) -> TritonServer:
        self.servers[name] = TritonServer(
            self.repository, **free_server_ports(),
            models=models, log_file=self.work / f"{name}.log",
        )
        return self.servers[name]

    def url(self, name: str) -> str:
        return self.servers[name].urls.grpc

    def target(self, group: str, name: str) -> str:
        return f"{group}/1@{self.url(name)}"

    def membership(self, group: str, name: str) -> dict[str, float]:
        """The orchestrator's `disagg_router_workers` for one target: {"true": x, "false": y}."""
        values = metric_values(self.servers["orchestrator"], "disagg_router_workers")
        target = f'worker="{self.target(group, name)}"'
        return {h: v for labels, v in values.items() if target in labels for h in ("true", "false")
                if f'healthy="{h}"' in labels}

    def in_flight(self, group: str, name: str) -> float:
        values = metric_values(self.servers["orchestrator"], "disagg_router_in_flight")
        return sum(v for labels, v in values.items() if f'worker="{self.target(group, name)}"' in labels)

    def served(self, name: str, metric: str = "disagg_kv_pulls_completed_total") -> float:
        """A count from a worker server's own metrics port."""
        return sum(metric_values(self.servers[name], metric).values())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("scale_out")
    cluster = Cluster(work)
    shutil.copytree(DEFAULT_MODEL_REPOSITORY, cluster.repository, ignore=shutil.ignore_patterns("__pycache__"))
    for model in ("context", "generation"):
        config = cluster.repository / model / "config.pbtxt"
        set_parameter(config, "kv_use_shared_memory", "false")  # KV over UCX, as across hosts
        set_parameter(config, "kv_cache_memory_bytes", str(128 << 20))
        set_parameter(config, "dtype", "float32")  # its answers are compared with the session server's
    set_parameter(cluster.repository / "disaggregated_serving_bls" / "config.pbtxt", "deployment_file",
                  str(cluster.deployment))
    workers = [cluster.server("context", MODES["context-server"]),
               cluster.server("generation", MODES["generation-server"]),
               cluster.server("generation2", MODES["generation-server"])]
    # Only the first generation server is in the deployment; the second joins in a test.
    cluster.deployment.write_text(deployment_text([cluster.url("context")], [cluster.url("generation")]))
    orchestrator = cluster.server("orchestrator", MODES["orchestrator"])  # no engine of its own
    try:
        with ThreadPoolExecutor(len(cluster.servers)) as pool:
            for started in [pool.submit(s.start) for s in [*workers, orchestrator]]:
                started.result()
        # The orchestrator started next to loading workers and took them out of rotation: wait until
        # its health checks see them, or the first requests would be prefilled on the generation server.
        wait_until(lambda: cluster.membership("context", "context") == {"true": 1, "false": 0}
                   and cluster.membership("generation", "generation") == {"true": 1, "false": 0}, timeout_s=30)
        yield cluster
    finally:
        with ThreadPoolExecutor(len(cluster.servers)) as pool:
            list(pool.map(TritonServer.stop, cluster.servers.values()))


def test_three_servers_answer_like_the_single_server_path(cluster, aggregated_answers):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: generate(cluster.servers["orchestrator"], "ensemble", p), PROMPTS))
    assert answers == [aggregated_answers[p] for p in PROMPTS]
    # The KV crossed the process boundary over UCX: the context server sent it, the generation server pulled it.
    assert cluster.served("context", "disagg_kv_bytes_sent_total") > 0
    assert cluster.served("generation") >= len(PROMPTS)
    assert cluster.membership("context", "context") == {"true": 1, "false": 0}
    assert cluster.served("generation2") == 0  # not in the deployment yet


def test_a_remote_workers_refusal_is_the_clients_error(cluster):
    """The context server refuses a prompt beyond its context window: INVALID_ARG crosses the gRPC
    hop as such, and nothing is retried or prefilled elsewhere."""
    orchestrator = cluster.servers["orchestrator"]

    def count(name: str) -> float:
        return sum(metric_values(orchestrator, f"disagg_orchestrator_{name}").values())

    requests = count("requests_total")
    retries, fallbacks = count("context_retries_total"), count("context_fallbacks_total")
    with pytest.raises(urllib.error.HTTPError) as refused:
        generate(orchestrator, "ensemble", "word " * 9000, max_tokens=4)
    assert refused.value.code == 400
    assert "context window" in refused.value.read().decode()
    wait_until(lambda: count("requests_total") == requests + 1, timeout_s=10)  # its counts are published
    assert (count("context_retries_total"), count("context_fallbacks_total")) == (retries, fallbacks)


def test_a_generation_server_added_to_the_file_takes_traffic_and_drains_when_removed(
    cluster, triton_server, aggregated_answers
):
    orchestrator = cluster.servers["orchestrator"]
    prompts = [PROMPTS[1], PROMPTS[3], PROMPTS[4], PROMPTS[5]]
    # Long enough answers that requests are still running when the server is removed.
    with ThreadPoolExecutor(len(prompts)) as pool:
        expected = list(pool.map(lambda p: generate(triton_server, "ensemble_aggregated", p, 32), prompts))
    both = [cluster.url("generation"), cluster.url("generation2")]
    rewrite(cluster.deployment, deployment_text([cluster.url("context")], both))
    wait_until(lambda: cluster.membership("generation", "generation2") == {"true": 1, "false": 0}, timeout_s=10)

    pulls_before = cluster.served("generation2")
    with ThreadPoolExecutor(len(prompts)) as pool:
        # Requests balance by count: with four in flight, the new server runs two of them.
        running = [pool.submit(generate, orchestrator, "ensemble", p, 32) for p in prompts]
        wait_until(lambda: cluster.in_flight("generation", "generation2") > 0, timeout_s=30, interval_s=0.05)
        # Remove it while its requests run: they finish there, new requests go elsewhere.
        rewrite(cluster.deployment, deployment_text([cluster.url("context")], both[:1]))
        wait_until(lambda: cluster.membership("generation", "generation2") == {"true": 0, "false": 0}, timeout_s=10)
        assert cluster.in_flight("generation", "generation2") > 0  # draining, not dropped
        answers = [f.result(timeout=120) for f in running]
    assert answers == expected
    assert cluster.served("generation2") > pulls_before  # it took traffic
    wait_until(lambda: cluster.in_flight("generation", "generation2") == 0, timeout_s=10)

    drained = cluster.served("generation2")
    with ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda p: generate(orchestrator, "ensemble", p), PROMPTS[:4]))
    assert after == [aggregated_answers[p] for p in PROMPTS[:4]]
    assert cluster.served("generation2") == drained  # nothing new reached the removed server


def test_a_frozen_context_server_leaves_rotation_and_comes_back(cluster, aggregated_answers):
    orchestrator, context = cluster.servers["orchestrator"], cluster.servers["context"]
    os.killpg(context.pid, signal.SIGSTOP)  # alive but answering nothing, health checks included
    try:
        wait_until(lambda: cluster.membership("context", "context") == {"true": 0, "false": 1}, timeout_s=15)
        fallbacks = sum(metric_values(orchestrator, "disagg_orchestrator_context_fallbacks_total").values())
        # Out of rotation: the generation server prefills, nothing waits on the frozen one.
        assert generate(orchestrator, "ensemble", PROMPTS[1]) == aggregated_answers[PROMPTS[1]]
        # The orchestrator publishes its counters once a request's `execute` returns, just after its last answer.
        wait_until(lambda: sum(metric_values(orchestrator, "disagg_orchestrator_context_fallbacks_total").values())
                   == fallbacks + 1, timeout_s=10)
    finally:
        os.killpg(context.pid, signal.SIGCONT)
    wait_until(lambda: cluster.membership("context", "context") == {"true": 1, "false": 0}, timeout_s=15)
    sent = cluster.served("context", "disagg_kv_bytes_sent_total")
    assert generate(orchestrator, "ensemble", PROMPTS[4]) == aggregated_answers[PROMPTS[4]]
    assert cluster.served("context", "disagg_kv_bytes_sent_total") > sent  # back in rotation: it prefilled that


def test_killing_the_context_server_loses_no_request(cluster, aggregated_answers):
    orchestrator, context = cluster.servers["orchestrator"], cluster.servers["context"]

    def recovered() -> float:
        """Requests prefilled on the generation server: the orchestrator's fallbacks and failed pulls."""
        return (sum(metric_values(orchestrator, "disagg_orchestrator_context_fallbacks_total").values())
                + cluster.served("generation", "disagg_kv_pull_fallbacks_total"))

    before = recovered()
    with ThreadPoolExecutor(2 * len(PROMPTS)) as pool:
        running = [pool.submit(generate, orchestrator, "ensemble", p) for p in PROMPTS]
        wait_until(lambda: holds_work(context), timeout_s=60, interval_s=0.02)  # killed mid-work, not on a timer
        os.killpg(context.pid, signal.SIGKILL)  # the whole server: tritonserver and its stubs
        # Sent after the kill: they reach a dead server (or one already out of rotation).
        running += [pool.submit(generate, orchestrator, "ensemble", p) for p in PROMPTS]
        answers = [f.result(timeout=120) for f in running]
    assert answers == [aggregated_answers[p] for p in PROMPTS * 2]
    wait_until(lambda: recovered() >= before + len(PROMPTS), timeout_s=10)
    wait_until(lambda: cluster.membership("context", "context") == {"true": 0, "false": 1}, timeout_s=10)
    # Nothing waits on the dead server any more.
    started = time.monotonic()
    assert generate(orchestrator, "ensemble", PROMPTS[1]) == aggregated_answers[PROMPTS[1]]
    assert time.monotonic() - started < 15


def test_every_server_stops_without_a_crash(cluster):
    """Last in this module: SIGTERM each server still running (a test above killed the context
    server), as Ctrl-C does. Each exits 0 and none of their stubs crashes on the way out (issue 21)."""
    running = {name: server for name, server in cluster.servers.items() if server.running}
    assert set(running) >= {"orchestrator", "generation", "generation2"}
    with ThreadPoolExecutor(len(running)) as pool:
        list(pool.map(TritonServer.stop, running.values()))
    for name, server in running.items():
        log = server.log_file.read_text()
        assert server.exit_status == 0, f"{name}: {log[-3000:]}"
        crashes = crash_lines(log)
        assert crashes == [], f"{name}: " + "\n".join(crashes)
