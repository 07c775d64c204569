"""What the ensemble and the orchestrator add, at low load, over calling an engine model directly.

One request at a time, streamed over gRPC, the same prompt length and output length on every
path; each path gets prompts of its own (a shared prompt would be served from a prefix cache):

    ensemble                   preprocessing -> BLS -> context + generation -> postprocessing
    ensemble_aggregated        preprocessing -> aggregated -> postprocessing
    disaggregated_serving_bls  BLS -> context + generation, token ids in and out
    generation                 one engine, both phases, token ids in and out
    aggregated                 the same engine role as in ensemble_aggregated
    context                    the context phase alone: first token and KV handle (TTFT only)
    openai                     with --openai-url: /v1/completions streamed over HTTP (SSE) by the
                               OpenAI frontend, which calls disaggregated_serving_bls over gRPC

Per path: TTFT and inter-token latency (ITL) p50/p90 in ms. The orchestration overhead is a
path's ITL p50 minus `generation`'s: every token of a disaggregated request passes through the
BLS (and, for `ensemble`, postprocessing). The paths are interleaved request by request, so
a slow spell of the machine hits them all alike. `context` splits the disaggregated TTFT into
the context model's own work and the BLS around it.

With the default model a decode step (~95 ms here) varies by more than the hops cost; serve the
2-layer model of `benchmarks.tiny_model` to resolve them.

    .venv/bin/disagg-serve --mode both &
    .venv/bin/python -m benchmarks.orchestration_overhead --url localhost:8001 --requests 20
    .venv/bin/python -m benchmarks.orchestration_overhead --openai-url localhost:9000 \
        --paths ensemble disaggregated_serving_bls openai     # what the OpenAI frontend adds
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import random
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient

from client.benchmark import load_tokenizer
from client.datasets import PromptCutter, corpus_text
from client.generate import infer_inputs
from client.metrics import percentile

TEXT_PATHS = ("ensemble", "ensemble_aggregated")
TOKEN_PATHS = ("disaggregated_serving_bls", "generation", "aggregated", "context")


@dataclass
class PathTimings:
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def request_arrays(path: str, prompt: str, prompt_ids: list[int], output_len: int) -> dict[str, np.ndarray]:
    if path in TEXT_PATHS:
        return {
            "text_input": np.array([prompt.encode()], dtype=np.object_),
            "max_tokens": np.array([output_len], dtype=np.int32),
            "stream": np.array([True]),
            "exclude_input_in_output": np.array([True]),
        }
    return {
        "input_ids": np.array(prompt_ids, dtype=np.int32),
        "request_output_len": np.array([output_len], dtype=np.int32),
        "streaming": np.array([True]),
    }


def timed_stream(url: str, model: str, arrays: dict[str, np.ndarray], timeout_s: float) -> list[float]:
    """perf_counter() at each response that carried output, from the moment the request was sent."""
    client = grpcclient.InferenceServerClient(url)
    arrivals: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: arrivals.put((time.perf_counter(), result, error)))
    times = []
    try:
        sent = time.perf_counter()
        client.async_stream_infer(model, infer_inputs(arrays), enable_empty_final_response=True)
        while True:
            at, result, error = arrivals.get(timeout=timeout_s)
            if error is not None:
                raise RuntimeError(f"{model}: {error}")
            response = result.get_response()
            if response.outputs:
                times.append(at - sent)
            if response.parameters["triton_final_response"].bool_param:
                return times
    finally:
        client.stop_stream()
        client.close()


def timed_openai_stream(address: str, prompt: str, output_len: int, timeout_s: float) -> list[float]:
    """The same as timed_stream, through the OpenAI frontend: one SSE event per engine response."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        connection.request("GET", "/v1/models")
        model = json.loads(connection.getresponse().read())["data"][0]["id"]
        body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True}
        sent = time.perf_counter()
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"openai: {response.status} {response.read()!r}")
        times = []
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            at = time.perf_counter()
            choices = json.loads(line[len(b"data: "):])["choices"]
            if choices and choices[0]["finish_reason"] is None:
                times.append(at - sent)
        return times
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--requests", type=int, default=20, help="measured requests per path")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests per path first")
    parser.add_argument("--isl", type=int, default=128, help="prompt tokens")
    parser.add_argument("--osl", type=int, default=32, help="output tokens")
    parser.add_argument("--openai-url", help="host:port of the OpenAI frontend, for the `openai` path")
    parser.add_argument("--paths", nargs="+", default=[*TEXT_PATHS, *TOKEN_PATHS])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(None)
    cutter = PromptCutter(tokenizer, corpus_text())
    rng = random.Random(args.seed)
    timings = {path: PathTimings() for path in args.paths}
    for index in range(args.warmup + args.requests):
        for path in args.paths:
            prompt = cutter.random_prompt(rng, args.isl)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if path == "openai":
                times = timed_openai_stream(args.openai_url, prompt, args.osl, args.timeout_s)
            else:
                arrays = request_arrays(path, prompt, prompt_ids, args.osl)
                times = timed_stream(args.url, path, arrays, args.timeout_s)
            if index < args.warmup:
                continue
            timings[path].ttft_ms.append(times[0] * 1000)
            timings[path].itl_ms += [(b - a) * 1000 for a, b in zip(times, times[1:])]
            timings[path].tokens.append(len(times))
        print(f"\r{index + 1}/{args.warmup + args.requests} rounds", end="", flush=True)
    print(f"\n\nISL {args.isl}, OSL {args.osl}, {args.requests} requests per path, one at a time, gRPC streaming\n")
    baseline = statistics.median(timings["generation"].itl_ms) if "generation" in timings else None
    print("| path | TTFT p50 ms | TTFT p90 ms | ITL p50 ms | ITL p90 ms | ITL p50 over `generation` ms"
          " | responses/request |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path, t in timings.items():
        ttft = f"| {path} | {statistics.median(t.ttft_ms):.1f} | {percentile(t.ttft_ms, 90):.1f} "
        if not t.itl_ms:  # one response per request (`context`)
            print(f"{ttft}| - | - | - | {statistics.mean(t.tokens):.1f} |")
            continue
        itl50 = statistics.median(t.itl_ms)
        over = f"{itl50 - baseline:+.2f}" if baseline is not None else "-"
        print(f"{ttft}| {itl50:.2f} | {percentile(t.itl_ms, 90):.2f} | {over} | {statistics.mean(t.tokens):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
