"""What the tests that start a tritonserver share: prompts, requests, metrics, waiting, stub processes."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import tritonclient.grpc as grpcclient

from launcher.openai_process import OpenAIFrontend
from launcher.ports import free_ports
from python_backend_utils.triton_glue.stub_recovery import stub_pids as find_stub_pids

REPO_ROOT = Path(__file__).resolve().parent.parent

# Prompts from one token to a few hundred, so block boundaries, partial blocks and multi-block
# transfers all occur (the context instances' blocks hold 16 tokens).
PROMPTS = [
    "Hi",
    "The capital of France is",
    "def quicksort(items):\n    ",
    "Write a haiku about the sea.",
    " ".join(f"item {i}," for i in range(60)) + " and the next item is",
    "The history of the printing press begins in " + "the fifteenth century, " * 30 + "when",
]


def stream_results(url: str, model: str, inputs: list[grpcclient.InferInput]) -> list[grpcclient.InferResult]:
    """Every response of one gRPC streaming request that carries outputs."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    results = []
    try:
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=120)
            assert error is None, error
            if result.get_output("text_output") is not None:
                results.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return results
    finally:
        client.stop_stream()
        client.close()


# Settings that make a test server's engines compute in fp32, whatever `dtype: auto` picks: for servers whose
# answers are compared with the session server's (tests/conftest.py says why it runs fp32) or with transformers'.
FP32_SETTINGS = tuple(f"{model}.dtype=float32" for model in ("context", "generation", "aggregated"))


@contextlib.contextmanager
def openai_frontend(server, work: Path, triton_model: str = "disaggregated_serving_bls") -> Iterator[OpenAIFrontend]:
    """The OpenAI frontend on a free port in front of `server`'s `triton_model`, its log in `work`."""
    [port] = free_ports(1)
    frontend = OpenAIFrontend(triton_grpc_url=server.urls.grpc, triton_model=triton_model, port=port,
                              host="127.0.0.1", log_file=work / "frontend.log")
    try:
        frontend.start()
        yield frontend
    finally:
        frontend.stop()


def post_json(url: str, body: dict) -> bytes:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read()


def generate(server, model: str, prompt: str, max_tokens: int = 12) -> str:
    body = {"text_input": prompt, "max_tokens": max_tokens, "exclude_input_in_output": True}
    return json.loads(post_json(f"http://{server.urls.http}/v2/models/{model}/generate", body))["text_output"]


def metric_values(server, name: str) -> dict[str, float]:
    """Every sample of one metric on the metrics port, by its label text."""
    with urllib.request.urlopen(f"http://{server.urls.metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name):].rsplit(" ", 1)
            values[labels] = float(value)
    return values


def holds_work(server, model: str | None = None) -> bool:
    """The server (or its `model`) holds requests: prefilling, decoding, pulling or holding KV for a
    pull (gauges published every engine step). A fault struck then cannot miss the load."""
    return sum(value for name in ("running", "awaiting_kv", "kv_held")
               for labels, value in metric_values(server, f"disagg_sequences_{name}").items()
               if model is None or f'model="{model}"' in labels) >= 1


def wait_for_idle_kv(server, timeout_s: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        used = metric_values(server, "disagg_kv_blocks_used")
        if all(v == 0 for v in used.values()) or time.monotonic() > deadline:
            return used
        time.sleep(0.2)


# What a crashed process leaves in a server log (UCX's handler, Triton's own signal report).
CRASH_LINE = re.compile(r"Caught signal|Segmentation fault|backtrace|Signal \((11|6)\)|terminate called")


def crash_lines(log_text: str) -> list[str]:
    return [line for line in log_text.splitlines() if CRASH_LINE.search(line)]


def wait_until(condition, timeout_s: float, interval_s: float = 0.05):
    """The condition's first truthy value; fails the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval_s)
    return result


def stub_pids(server, model: str, version: int = 1) -> list[int]:
    """The live Python-backend stub processes of one model version on this server."""
    return find_stub_pids(server.model_repository, model, version)
