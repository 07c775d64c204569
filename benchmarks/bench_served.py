"""Streaming chat against any OpenAI-compatible server: ours on :9000 and llama-server measured alike.

    python -m benchmarks.bench_served --url localhost:9000 --streams 1 8 --label ours
    python -m benchmarks.bench_served --url localhost:9100 --streams 1 8 --label llama-server

Each level runs `streams` clients at once, each sending `--rounds` chat requests one after another
(a distinct prompt each, so no prefix cache serves one from another), `--max-tokens` tokens out with
ignore_eos (both servers honour it, so every answer has the same length), greedy. Reported per level:
output tokens per second over the level's wall time, one stream's decode rate (tokens after the
first over the time after the first), and time to first token. Benchmark only: it prints a table
and, with --json, writes the numbers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

TOPICS = ["the sea", "a lighthouse", "bread", "the moon", "rivers", "a library", "winter", "trains", "bees",
          "copper", "glaciers", "the printing press", "tea", "volcanoes", "owls", "maps"]


def prompt_for(index: int) -> str:
    return f"Request {index}. Write a long, detailed essay about {TOPICS[index % len(TOPICS)]}."


def timed_chat_stream(address: str, model: str, prompt: str, max_tokens: int,
                      timeout_s: float) -> tuple[float, float, int]:
    """(seconds to the first token, seconds to the last, tokens out) of one streamed chat answer."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    try:
        sent = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{address}: HTTP {response.status} {response.read()[:300]!r}")
        first = last = None
        events = usage_tokens = 0
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: "):])
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens", 0)
            if any(choice.get("delta", {}).get("content") for choice in chunk.get("choices", [])):
                last = time.perf_counter() - sent
                first = last if first is None else first
                events += 1
        if first is None:
            raise RuntimeError(f"{address}: an answer without content")
        return first, last, usage_tokens or events
    finally:
        connection.close()


def served_model(address: str) -> str:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", "/v1/models")
        return json.loads(connection.getresponse().read())["data"][0]["id"]
    finally:
        connection.close()


def measure_level(address: str, model: str, streams: int, rounds: int, max_tokens: int, first_index: int,
                  timeout_s: float) -> dict:
    def client(stream: int) -> list[tuple[float, float, int]]:
        return [timed_chat_stream(address, model, prompt_for(first_index + stream * rounds + r), max_tokens, timeout_s)
                for r in range(rounds)]

    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        answers = [answer for answers in pool.map(client, range(streams)) for answer in answers]
    wall = time.perf_counter() - started
    decode_rates = [(tokens - 1) / (last - first) for first, last, tokens in answers if tokens > 1 and last > first]
    ttfts = sorted(first for first, _, _ in answers)
    return {
        "streams": streams,
        "answers": len(answers),
        "output_tok_per_s": sum(tokens for _, _, tokens in answers) / wall,
        "stream_decode_tok_per_s_median": statistics.median(decode_rates),
        "ttft_s_median": statistics.median(ttfts),
        "ttft_s_max": ttfts[-1],
        "tokens_per_answer_min": min(tokens for _, _, tokens in answers),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:9000", help="host:port of the OpenAI-compatible server")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2, help="answers each stream asks for, one after another")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured answers first")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--label", default="", help="the name printed for this server")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    model = served_model(args.url)
    for index in range(args.warmup):
        timed_chat_stream(args.url, model, prompt_for(10_000 + index), args.max_tokens, args.timeout_s)
    label = args.label or args.url
    levels, first_index = [], 0
    for streams in args.streams:
        levels.append(measure_level(args.url, model, streams, args.rounds, args.max_tokens, first_index,
                                    args.timeout_s))
        first_index += streams * args.rounds
    print(f"{label} ({model} at {args.url}), streaming chat, {args.max_tokens} tokens out:")
    print("| streams | output tok/s | one stream's decode tok/s (median) | TTFT median s | TTFT max s |")
    print("|---:|---:|---:|---:|---:|")
    for level in levels:
        print(f"| {level['streams']} | {level['output_tok_per_s']:.1f} | {level['stream_decode_tok_per_s_median']:.1f}"
              f" | {level['ttft_s_median']:.3f} | {level['ttft_s_max']:.3f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"label": label, "url": args.url, "model": model, "levels": levels}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
