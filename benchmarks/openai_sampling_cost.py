"""What n choices cost through the OpenAI frontend: TTFT and ITL p50 with n=1 and n=3 on :9000, next
to the gRPC `ensemble` baseline, interleaved in one run (one request at a time), and the prompt
tokens the n=3 requests' later choices took from the prefix cache (the server's
disagg_prefix_cache_hit_tokens_total, published with `--set context.detailed_metrics=true`).

    python -m benchmarks.openai_sampling_cost --grpc-url localhost:8001 --openai-url http://localhost:9000/v1 \
        --metrics-url http://localhost:8002/metrics
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import urllib.request

import openai
import tritonclient.grpc.aio as grpcclient_aio

from client.datasets import BenchmarkRequest
from client.load_generator import ModelInterface, stream_request
from python_backend_utils.environment import DEFAULT_MODEL_NAME

FILLER = "The history of the city spans many centuries of trade, art and science. "


def prompt(round_index: int, kind: str, words: int) -> str:
    """A prompt of its own per round and kind, so only a request's own choices share its prefix."""
    return f"Round {round_index} ({kind}): " + (FILLER * (words // 12 + 1))[: words * 6]


async def openai_timing(client: openai.AsyncOpenAI, text: str, max_tokens: int, n: int) -> tuple[float, list[float]]:
    """(TTFT: until every choice has its first text, the inter-chunk gaps of every choice)."""
    sent = time.perf_counter()
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    gaps: list[float] = []
    stream = await client.completions.create(model=DEFAULT_MODEL_NAME, prompt=text, max_tokens=max_tokens,
                                             temperature=0, n=n, stream=True, extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        for choice in chunk.choices:
            if choice.text:
                if choice.index in last:
                    gaps.append(now - last[choice.index])
                else:
                    first[choice.index] = now - sent
                last[choice.index] = now
    return max(first.values()), gaps


def prefix_hits(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("disagg_prefix_cache_hit_tokens_total{"))


async def main(args: argparse.Namespace) -> dict:
    grpc = grpcclient_aio.InferenceServerClient(args.grpc_url)
    interface = ModelInterface.from_metadata(await grpc.get_model_metadata(args.model, as_json=True))
    client = openai.AsyncOpenAI(base_url=args.openai_url, api_key="unused", max_retries=0)
    results = {"grpc": ([], []), "openai n=1": ([], []), "openai n=3": ([], [])}
    hits = 0.0
    for index in range(args.rounds + 1):  # round 0 warms up
        request = BenchmarkRequest(prompt=prompt(index, "grpc", args.prompt_words), input_tokens=0,
                                   max_tokens=args.max_tokens)
        timing = await stream_request(grpc, args.model, index, interface.tensors(request, None, 0))
        one = await openai_timing(client, prompt(index, "n=1", args.prompt_words), args.max_tokens, 1)
        before = prefix_hits(args.metrics_url)
        three = await openai_timing(client, prompt(index, "n=3", args.prompt_words), args.max_tokens, 3)
        if index:
            hits += prefix_hits(args.metrics_url) - before
            times = timing.response_times
            results["grpc"][0].append(times[0] - timing.sent_at)
            results["grpc"][1].extend(b - a for a, b in zip(times, times[1:]))
            for name, (ttft, gaps) in (("openai n=1", one), ("openai n=3", three)):
                results[name][0].append(ttft)
                results[name][1].extend(gaps)
    await grpc.close()
    report = {name: {"ttft_p50_ms": 1000 * statistics.median(ttfts), "itl_p50_ms": 1000 * statistics.median(gaps)}
              for name, (ttfts, gaps) in results.items()}
    report["n=3: prefix-cache hit tokens per request"] = hits / args.rounds
    report["prompt tokens"] = (await client.completions.create(
        model=DEFAULT_MODEL_NAME, prompt=prompt(0, "n=1", args.prompt_words), max_tokens=1)).usage.prompt_tokens
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc-url", default="localhost:8001")
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--openai-url", default="http://localhost:9000/v1")
    parser.add_argument("--metrics-url", default="http://localhost:8002/metrics")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--prompt-words", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=32)
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
