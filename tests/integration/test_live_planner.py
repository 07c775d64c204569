"""The live planner against a real server on the tiny model: a prefill-heavy burst grows a 1 + 1
deployment to 2 + 1, the quiet after it shrinks it back, and every request gets the answer the
1 + 1 deployment gave before.

The planner's calibration here is not a measurement of the tiny model: it says one of the test's
prompts (about 850 tokens with this tokenizer) takes 0.3 s to prefill, so that the simulator's
verdict is clear at the test's rates (one context instance misses a TTFT of 800 ms from about
2.5 requests/s on, two meet it up to 5; the quiet rate, even with the shrink's headroom, needs one). What is under test is the loop: metrics, estimate,
hysteresis, the rewritten file, the orchestrator loading and draining instances.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks.tiny_model import write_tiny_model
from client.metrics import Slo
from launcher import TritonServer
from launcher.ports import free_server_ports
from launcher.repository import Setting, render_repository
from launcher.server import DEFAULT_MODEL_REPOSITORY
from planner.calibration import Calibration
from planner.live import Hysteresis, LivePlanner, Sizing, Split
from tests.helpers import generate, metric_values, stub_pids

pytestmark = pytest.mark.integration

DEPLOYMENT = """\
context_servers:
  num_instances: 1
  router: {type: load_balancing, load_metric: tokens}
generation_servers:
  num_instances: 1
  router: {type: load_balancing, load_metric: tokens}
watch_interval_s: 0.5
"""
# Long prompts, four-token answers: the context side carries the load.
PROMPTS = [f"Report {n}: " + " ".join(f"item {n * 1000 + k}," for k in range(130)) for n in range(4)]
BURST_RATE = 4.0  # requests per second while the burst lasts
QUIET_RATE = 0.3  # afterwards: light traffic, so instances drain with requests around


def tiny_calibration() -> Calibration:
    return Calibration(
        description="test: 0.3 s per 850-token prefill", command="tests/integration/test_live_planner.py",
        prefill_fixed_s=0.0, prefill_per_token_s=0.3 / 850, prefill_per_token_squared_s=0.0,
        decode_batch_sizes=(1,), decode_base_s=(0.005,), decode_per_context_token_s=0.0, kv_bytes_per_token=1000,
        kv_transfer_latency_s=0.001, kv_transfer_bytes_per_s=1e9, request_overhead_s=0.0,
        disaggregated_overhead_s=0.0, kv_capacity_tokens=100_000,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("live-planner")
    model = write_tiny_model(work / "tiny")
    deployment = work / "deployment.yaml"
    deployment.write_text(DEPLOYMENT)
    repository = work / "model_repository"
    settings = [f"{m}.kv_cache_memory_bytes={32 << 20}" for m in ("context", "generation")]
    render_repository(DEFAULT_MODEL_REPOSITORY, repository, deployment, tuple(map(Setting.parse, settings)))
    server = TritonServer(repository, **free_server_ports(), models=["ensemble", "context", "generation"],
                          model_dir=str(model), log_file=work / "server.log")
    try:
        server.start()
        yield server, deployment
    finally:
        server.stop()


def in_rotation(server, target: str) -> bool:
    return any(f'worker="{target}"' in labels and 'healthy="true"' in labels and value == 1.0
               for labels, value in metric_values(server, "disagg_router_workers").items())


def send_at(rate: float, pool: ThreadPoolExecutor, server, until, futures: list) -> None:
    """Open loop: one request every 1/rate s, cycling through PROMPTS, until `until()` is true."""
    while not until():
        prompt = PROMPTS[len(futures) % len(PROMPTS)]
        futures.append((prompt, pool.submit(generate, server, "ensemble", prompt, 4)))
        time.sleep(1 / rate)


def test_a_prefill_heavy_burst_grows_the_context_side_and_the_quiet_shrinks_it(served):
    server, deployment = served
    reference = {prompt: generate(server, "ensemble", prompt, 4) for prompt in PROMPTS}
    log: list[str] = []
    planner = LivePlanner(
        metrics_url=server.urls.metrics, deployment_file=deployment,
        sizing=Sizing(tiny_calibration(), Slo(ttft_ms=800, tpot_ms=200), attainment=0.9, max_workers=3,
                      headroom=0.5),
        window_s=3.0, hysteresis=Hysteresis(Split(1, 1), polls=3, cooldown_s=5.0), apply=True,
        log=lambda line: log.append(f"{time.monotonic():.1f} {line}"))
    stop = threading.Event()
    thread = threading.Thread(target=planner.run, args=(0.5, stop), daemon=True)
    futures: list = []
    started = time.monotonic()
    try:
        thread.start()
        with ThreadPoolExecutor(32) as pool:
            grown_at: list[float] = []

            def grown_and_used() -> bool:
                if time.monotonic() - started > 90:
                    return True
                if not grown_at and in_rotation(server, "context/2"):
                    grown_at.append(time.monotonic())
                return bool(grown_at) and time.monotonic() - grown_at[0] > 3  # context/2 takes some of them

            send_at(BURST_RATE, pool, server, grown_and_used, futures)
            assert grown_at, "\n".join(log)
            assert planner.changes[0][1] == Split(2, 1)
            assert "num_instances: 2" in deployment.read_text()
            burst = len(futures)

            def shrunk() -> bool:
                return time.monotonic() - started > 150 or (
                    planner.changes[-1][1] == Split(1, 1) and not stub_pids(server, "context", 2))

            send_at(QUIET_RATE, pool, server, shrunk, futures)
            assert planner.changes[-1][1] == Split(1, 1), "\n".join(log)
            assert not stub_pids(server, "context", 2), "context version 2 was never unloaded"
            answers = [(prompt, future.result(timeout=60)) for prompt, future in futures]
    finally:
        stop.set()
        thread.join(timeout=10)
    assert [change for _, change in planner.changes] == [Split(2, 1), Split(1, 1)], "\n".join(log)
    assert all(answer == reference[prompt] for prompt, answer in answers)
    assert not in_rotation(server, "context/2") and in_rotation(server, "context/1")
    assert not Path(server.model_repository, "context", "2").exists()
    assert len(answers) > burst
    print(f"{len(answers)} requests ({burst} in the burst), all answered as before; planner log:\n" + "\n".join(log))
