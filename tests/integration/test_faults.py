"""Faults under load: every request completes correctly or ends with a clear error, none hangs,
and afterwards the service is whole again: a killed stub is replaced and serves.

A server of its own (one context and one generation instance), so that killing and freezing
its stubs cannot disturb other tests. The reference answers come from the session server's
aggregated path.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor

import pytest

from launcher import TritonServer
from launcher.ports import free_server_ports
from launcher.repository import Setting, render_repository
from launcher.server import DEFAULT_MODEL_REPOSITORY
from tests.helpers import PROMPTS, generate, metric_values, stub_pids, wait_for_idle_kv, wait_until

pytestmark = pytest.mark.integration

TRANSFER_TIMEOUT_S = 3
REQUEST_DEADLINE_S = 240  # far above any answer here: reaching it means a request hung


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    (work / "deployment.yaml").write_text("context_servers:\n  num_instances: 1\ngeneration_servers:\n  num_instances: 1\n"
                                          "context_timeout_s: 20\n")
    settings = [f"{model}.kv_transfer_timeout_s={TRANSFER_TIMEOUT_S}" for model in ("context", "generation")]
    settings += [f"{model}.kv_response_timeout_s={TRANSFER_TIMEOUT_S}" for model in ("context", "generation")]
    settings += [f"{model}.kv_cache_memory_bytes={128 << 20}" for model in ("context", "generation")]
    repository = work / "model_repository"
    render_repository(DEFAULT_MODEL_REPOSITORY, repository, work / "deployment.yaml", tuple(map(Setting.parse, settings)))
    triton = TritonServer(repository, **free_server_ports(),
                          models=["ensemble", "context", "generation"], log_file=work / "server.log")
    try:
        triton.start()
        yield triton
    finally:
        triton.stop()


def stub_pid(server, model: str) -> int:
    [pid] = stub_pids(server, model)
    return pid


def total(server, name: str) -> float:
    return sum(metric_values(server, name).values())


def reloads(server) -> float:
    return total(server, "disagg_orchestrator_stub_reloads_total")


def wait_for_replacement(server, model: str, victim: int, reloads_before: float) -> None:
    """The orchestrator reloaded the dead instance, which runs a new stub and is back in rotation."""
    wait_until(lambda: reloads(server) > reloads_before, timeout_s=180, interval_s=1)
    assert stub_pids(server, model) not in ([], [victim])
    assert in_rotation(server, model)


def in_rotation(server, model: str) -> bool:
    return [value for labels, value in metric_values(server, "disagg_router_targets").items()
            if f'target="{model}/1"' in labels and 'healthy="true"' in labels] == [1]


def outcome(server, prompt: str) -> tuple[str, str]:
    """("ok", text) or ("error", the message the client got)."""
    try:
        return "ok", generate(server, "ensemble", prompt)
    except urllib.error.HTTPError as error:
        return "error", json.loads(error.read() or b"{}").get("error", f"HTTP {error.code}")


def under_load(server, fault, strike_when) -> list[tuple[str, str, str]]:
    """Eight concurrent requests with `fault()` striking while they run, once `strike_when()` is
    true: (prompt, kind, text)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(outcome, server, p) for p in prompts]
        wait_until(strike_when, timeout_s=60, interval_s=0.02)
        fault()
        results = [f.result(timeout=REQUEST_DEADLINE_S) for f in futures]  # a hang fails here
    return [(p, kind, text) for p, (kind, text) in zip(prompts, results)]


def after(seconds: float):
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() >= deadline


def serving(server, model: str) -> bool:
    """`model`'s instance holds requests: prefilling, decoding, pulling or holding KV for a pull
    (gauges published every engine step). A fault struck then cannot miss the load."""
    return sum(value for name in ("running", "awaiting_kv", "kv_held")
               for labels, value in metric_values(server, f"disagg_sequences_{name}").items()
               if f'model="{model}"' in labels) >= 1


def assert_serves_correctly(server, answers) -> None:
    assert [outcome(server, p) for p in PROMPTS[:3]] == [("ok", answers[p]) for p in PROMPTS[:3]]


def check(results, answers) -> dict[str, int]:
    counts = {"correct": 0, "error": 0}
    for prompt, kind, text in results:
        if kind == "ok":
            assert text == answers[prompt], prompt  # completed means completed correctly
            counts["correct"] += 1
        else:
            assert text, "an error must say what went wrong"
            counts["error"] += 1
    return counts


# The tests run in this order, each leaving the server whole for the next. Triton 2.51 never
# restarts the stub of a decoupled model: the orchestrator reloads the instance (stub_recovery.py).


def test_1_context_stub_frozen_past_the_transfer_timeout(server, aggregated_answers):
    """A transfer peer that stops answering: context calls time out and pulls from it fail at
    their timeout; the prompts are prefilled on the generation instance instead. (Triton's own
    check of the stub fails too, so the orchestrator may replace it meanwhile.)"""
    victim = stub_pid(server, "context")

    def freeze():
        os.kill(victim, signal.SIGSTOP)
        time.sleep(TRANSFER_TIMEOUT_S * 2)
        os.kill(victim, signal.SIGCONT)

    counts = check(under_load(server, freeze, after(2.0)), aggregated_answers)
    print("context stub SIGSTOP:", counts)
    assert counts["correct"] == 8
    assert_serves_correctly(server, aggregated_answers)
    # Half the KV handles' 30 s TTL: KV left pinned by the freeze must not pass as idle by expiring.
    used = wait_for_idle_kv(server, timeout_s=15)
    assert used and all(v == 0 for v in used.values()), used
    wait_until(lambda: len(stub_pids(server, "context")) == 1 and in_rotation(server, "context"), timeout_s=180)


def test_2_context_stub_killed_under_load(server, aggregated_answers):
    victim = stub_pid(server, "context")
    reloads_before = reloads(server)
    counts = check(under_load(server, lambda: os.kill(victim, signal.SIGKILL), after(1.0)), aggregated_answers)
    print("context stub SIGKILL:", counts)
    assert counts["correct"] == 8  # prefilled on the generation instance instead: nothing is lost
    assert_serves_correctly(server, aggregated_answers)  # and so are the requests that follow

    wait_for_replacement(server, "context", victim, reloads_before)
    fallbacks = total(server, "disagg_orchestrator_context_fallbacks_total")
    disaggregated = total(server, "disagg_orchestrator_disaggregated_total")
    assert_serves_correctly(server, aggregated_answers)
    # Counters are published once a request's `execute` returns, just after its last answer.
    wait_until(lambda: total(server, "disagg_orchestrator_disaggregated_total") >= disaggregated + 3, timeout_s=10)
    assert total(server, "disagg_orchestrator_context_fallbacks_total") == fallbacks  # prefilled on context again


def test_3_generation_stub_killed_under_load(server, aggregated_answers):
    """What was streaming there cannot be saved: it must end with an error that says so, at once."""
    victim = stub_pid(server, "generation")
    reloads_before = reloads(server)
    started = time.monotonic()
    counts = check(under_load(server, lambda: os.kill(victim, signal.SIGKILL), lambda: serving(server, "generation")),
                   aggregated_answers)
    print("generation stub SIGKILL:", counts, f"{time.monotonic() - started:.1f} s")
    assert counts["error"] >= 1
    assert time.monotonic() - started < 60  # errors come fast, not at a timeout

    wait_for_replacement(server, "generation", victim, reloads_before)
    assert_serves_correctly(server, aggregated_answers)
