"""Benchmark a Triton LLM model over gRPC streaming: TTFT, TPOT, ITL, throughput, goodput, plots.

    python -m client.benchmark run --url localhost:8001 --model ensemble --concurrency 4 \\
        --dataset mixed --num-requests 40 --out results/x.json
    python -m client.benchmark sweep --concurrency 1 2 4 8 --workers 1 --out-dir results/aggregated
    python -m client.benchmark plot results/aggregated results/disaggregated --out-dir plots
    python -m client.benchmark rate-match --context results/ctx --generation results/gen \\
        --ttft-limit-ms 2000 --out results/rate_matched.json
    python -m client.benchmark perf-inputs --out client/data/perf_inputs.json

A context-only measurement is the same run with `--osl 1` (TTFT only) against whichever model
runs the context phase (`--model`). Every run stops by itself: after --num-requests requests or
--time-limit-s seconds, whichever comes first (what is in flight then is cancelled and counted).
Prompts follow from --seed and the load level: repeating a run against the same server repeats
its prompts, which the server's prefix cache then serves fast; change --seed between repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import tritonclient.grpc.aio as grpcclient_aio
from tqdm import tqdm
from tritonclient.utils import InferenceServerException

from client.datasets import (
    DEFAULT_MIX,
    BenchmarkRequest,
    LengthDistribution,
    PromptCutter,
    WorkloadClass,
    build_requests,
    corpus_text,
    parse_mix,
    poisson_arrivals,
)
from client.load_generator import ModelInterface, ModelInterfaceError, run_load, stream_request
from client.metrics import Slo, summarize
from client.plots import Curve, Point, pareto_chart, tpot_chart
from client.rate_matching import ContextMeasurement, GenerationMeasurement, best_context, rate_match
from client.results import RunConfig, RunResult, load_runs, run_table, sweep_table


class BenchmarkError(RuntimeError):
    """The run cannot be measured (server unreachable, model unsuitable, warm-up failed)."""


@dataclass(frozen=True)
class Workload:
    """Requests to measure with and requests to warm up with (different prompts, same shape)."""

    description: str
    measured: list[BenchmarkRequest]
    warmup: list[BenchmarkRequest]


def load_tokenizer(path: str | None):
    """The served model's tokenizer, so that prompt lengths are counted as the server counts them."""
    from transformers import AutoTokenizer

    from python_backend_utils.environment import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir(path))


def workload_classes(args: argparse.Namespace) -> list[WorkloadClass]:
    if args.dataset == "mixed":
        return parse_mix(args.mix)
    return [WorkloadClass(1.0, LengthDistribution.parse(args.isl), LengthDistribution.parse(args.osl))]


def build_workload(args: argparse.Namespace, cutter: PromptCutter, name: str) -> Workload:
    """Prompts seeded by --seed and the load level's name: every level of a sweep gets prompts of
    its own, so the server's prefix cache never serves one level with another's prompts."""
    classes = workload_classes(args)
    description = f"mixed {args.mix}" if args.dataset == "mixed" else f"isl {classes[0].isl}, osl {classes[0].osl}"
    return Workload(
        description=description,
        measured=build_requests(cutter, classes, args.num_requests, f"{args.seed}-{name}"),
        warmup=build_requests(cutter, classes, args.warmup_requests, f"{args.seed}-{name}-warmup"),
    )


def load_name(concurrency: int | None, rate: float | None) -> str:
    return f"concurrency-{concurrency}" if concurrency is not None else f"rate-{rate:g}"


def output_token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


async def measure(config: RunConfig, workload: Workload, tokenizer, slo: Slo) -> RunResult:
    """Warm up, then run the measured phase with a progress bar."""
    client = grpcclient_aio.InferenceServerClient(config.url)
    try:
        try:
            interface = ModelInterface.from_metadata(await client.get_model_metadata(config.model, as_json=True))
        except InferenceServerException as error:
            raise BenchmarkError(f"cannot read the metadata of {config.model} at {config.url}: {error}") from None

        def sender(requests: list[BenchmarkRequest], phase: str):
            rng = random.Random(f"{config.seed}-{phase}-sampling")
            seeds = [rng.getrandbits(63) for _ in requests]
            return lambda index: stream_request(
                client, config.model, index, interface.tensors(requests[index], config.temperature, seeds[index])
            )

        if workload.warmup:
            warmup = await run_load(
                sender(workload.warmup, "warmup"),
                len(workload.warmup),
                config.time_limit_s,
                concurrency=config.concurrency or 1,
            )
            unfinished = len(workload.warmup) - sum(1 for t in warmup.timings if t.final_at is not None)
            if unfinished:
                errors = [t.error for t in warmup.timings if t.error]
                reason = errors[0] if errors else f"not done within --time-limit-s {config.time_limit_s:g}"
                raise BenchmarkError(f"{unfinished} of {len(workload.warmup)} warm-up requests failed: {reason}")

        arrivals = None
        if config.request_rate is not None:
            arrivals = poisson_arrivals(config.request_rate, config.num_requests, f"{config.seed}-arrivals")
        with tqdm(total=config.num_requests, desc=f"{config.label} {config.load}", unit="req") as progress:
            phase = await run_load(
                sender(workload.measured, "measured"),
                config.num_requests,
                config.time_limit_s,
                concurrency=config.concurrency,
                arrivals=arrivals,
                on_done=lambda timing: progress.update(),
            )
    finally:
        await client.close()
    measurements = [
        t.measurement(workload.measured[t.index], phase.started_at, output_token_count(tokenizer, t.text))
        for t in phase.timings
    ]
    config = replace(config, eos_suppressing_input=interface.eos_suppressing_input)
    return RunResult(config, summarize(measurements, phase.duration_s, config.workers, slo), measurements)


def run_config(
    args: argparse.Namespace, workload: Workload, label: str, concurrency: int | None, rate: float | None
) -> RunConfig:
    return RunConfig(
        label=label,
        url=args.url,
        model=args.model,
        concurrency=concurrency,
        request_rate=rate,
        workload=workload.description,
        num_requests=args.num_requests,
        warmup_requests=args.warmup_requests,
        time_limit_s=args.time_limit_s,
        workers=args.workers,
        seed=args.seed,
        temperature=args.temperature,
        eos_suppressing_input=None,  # measure() fills it in from the model's metadata
    )


def command_run(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.tokenizer)
    cutter = PromptCutter(tokenizer, corpus_text())
    workload = build_workload(args, cutter, load_name(args.concurrency, args.request_rate))
    config = run_config(args, workload, args.label or args.model, args.concurrency, args.request_rate)
    result = asyncio.run(measure(config, workload, tokenizer, slo_of(args)))
    print(run_table(result))
    if args.out:
        result.save(args.out)
        print(f"\nwrote {args.out}")
    return 0


def command_sweep(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.tokenizer)
    cutter = PromptCutter(tokenizer, corpus_text())
    label = args.label or args.out_dir.name
    levels = [(c, None) for c in args.concurrency or ()] + [(None, r) for r in args.request_rate or ()]
    results = []
    for concurrency, rate in levels:
        name = load_name(concurrency, rate)
        workload = build_workload(args, cutter, name)
        config = run_config(args, workload, label, concurrency, rate)
        result = asyncio.run(measure(config, workload, tokenizer, slo_of(args)))
        result.save(args.out_dir / f"{name}.json")
        print(run_table(result) + "\n", flush=True)
        results.append(result)
    print(sweep_table(results))
    print(f"\nwrote {len(results)} runs to {args.out_dir}")
    return 0


def load_note(result: RunResult) -> str:
    """A load level in a few characters, to label its point in a chart: c4, r0.5."""
    c = result.config
    return f"c{c.concurrency}" if c.concurrency is not None else f"r{c.request_rate:g}"


def command_plot(args: argparse.Namespace) -> int:
    pareto_curves, tpot_curves = [], []
    for path in args.paths:
        if path.is_file() and "points" in (data := json.loads(path.read_text())):  # a rate-match output
            points = tuple(
                Point(p["tokens_per_second_per_user"], p["throughput_per_worker"], p["load"])
                for p in data["points"]
            )
            pareto_curves.append(Curve(data["label"], points))
            continue
        runs = load_runs(path)
        if not runs:
            raise BenchmarkError(f"no run results in {path}")
        label = runs[0].config.label
        pareto_curves.append(Curve(label, tuple(
            Point(r.summary.tokens_per_second_per_user, r.summary.output_throughput_per_worker, load_note(r))
            for r in runs if r.summary.tokens_per_second_per_user is not None
        )))  # fmt: skip
        tpot_curves.append(Curve(label, tuple(
            Point(r.summary.request_throughput, r.summary.tpot_ms.p99, load_note(r))
            for r in runs if r.summary.tpot_ms is not None
        )))  # fmt: skip
    pareto_chart(pareto_curves, args.out_dir / "pareto.png")
    tpot_chart(tpot_curves, args.out_dir / "tpot_p99_vs_rate.png")
    print(f"wrote {args.out_dir / 'pareto.png'} and {args.out_dir / 'tpot_p99_vs_rate.png'}")
    return 0


def command_rate_match(args: argparse.Namespace) -> int:
    context_runs = [run for path in args.context for run in load_runs(path)]
    context = best_context(
        [
            ContextMeasurement(args.context_workers or r.config.workers, r.summary.request_throughput,
                               r.summary.ttft_ms.p99)
            for r in context_runs
            if r.summary.ttft_ms is not None
        ],
        args.ttft_limit_ms,
    )
    generation = [
        GenerationMeasurement(
            load_note(r),
            args.generation_workers or r.config.workers,
            r.summary.output_throughput,
            r.summary.request_throughput,
            r.summary.tokens_per_second_per_user,
        )
        for path in args.generation
        for r in load_runs(path)
        if r.summary.tokens_per_second_per_user is not None and r.summary.request_throughput > 0
    ]
    points = sorted((rate_match(context, g) for g in generation), key=lambda p: p.tokens_per_second_per_user)
    print(
        f"context: {context.rate_per_worker:.3f} req/s per worker "
        f"({context.num_workers} worker(s), TTFT p99 {context.ttft_p99_ms:.0f} ms <= {args.ttft_limit_ms:g} ms)\n"
    )
    print("| gen load | tok/s/user | gen tok/s | ctx workers | gen workers | ctx:gen | tok/s per worker |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for p in points:
        print(
            f"| {p.load} | {p.tokens_per_second_per_user:.2f} | {p.output_throughput:.2f} | {p.context_workers:.3f} "
            f"| {p.generation_workers} | {p.context_to_generation_ratio:.3f} | {p.throughput_per_worker:.2f} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "label": args.label,
            "ttft_limit_ms": args.ttft_limit_ms,
            "context": asdict(context),
            "points": [{**asdict(p), "context_to_generation_ratio": p.context_to_generation_ratio} for p in points],
        }
        args.out.write_text(json.dumps(body, indent=1) + "\n")
        print(f"\nwrote {args.out}")
    return 0


def command_perf_inputs(args: argparse.Namespace) -> int:
    """perf_analyzer --input-data: the ensemble's text inputs, streamed (one response per token)."""
    workload = build_workload(args, PromptCutter(load_tokenizer(args.tokenizer), corpus_text()), "perf-inputs")
    data = [
        {"text_input": [request.prompt], "max_tokens": [request.max_tokens], "stream": [True]}
        for request in workload.measured
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"data": data}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(data)} requests ({workload.description}) to {args.out}")
    return 0


def slo_of(args: argparse.Namespace) -> Slo:
    return Slo(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms)


def add_workload_options(parser: argparse.ArgumentParser, num_requests: int = 40) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--dataset", choices=["mixed", "single"], default="mixed",
                       help="mixed: classes from --mix; single: every request from --isl/--osl")
    group.add_argument("--mix", default=DEFAULT_MIX, help="WEIGHT:ISL:OSL,... (default %(default)s)")
    group.add_argument("--isl", default="128", help="input tokens: N, uniform:LOW:HIGH or normal:MEAN:STDDEV")
    group.add_argument("--osl", default="32", help="output tokens (max_tokens), same forms as --isl")
    group.add_argument("--num-requests", type=int, default=num_requests)
    group.add_argument("--seed", type=int, default=0, help="seeds prompts, lengths, arrivals and sampling")
    group.add_argument("--tokenizer", help="tokenizer directory (default: the default model's)")


def add_load_options(parser: argparse.ArgumentParser, many: bool) -> None:
    parser.add_argument("--url", default="localhost:8001", help="gRPC host:port")
    parser.add_argument("--model", default="ensemble")
    load = parser.add_mutually_exclusive_group(required=True)
    nargs = "+" if many else None
    load.add_argument("--concurrency", type=int, nargs=nargs, help="requests in flight (closed loop)")
    load.add_argument("--request-rate", type=float, nargs=nargs, help="Poisson arrivals per second (open loop)")
    add_workload_options(parser)
    parser.add_argument("--warmup-requests", type=int, default=2, help="sent before measuring, not counted")
    parser.add_argument("--time-limit-s", type=float, default=600.0, help="a run ends after this many seconds")
    parser.add_argument("--workers", type=int, default=1, help="engine instances serving (divides tok/s per worker)")
    parser.add_argument("--temperature", type=float, help="sample (with a per-request seed) instead of the default")
    parser.add_argument("--slo-ttft-ms", type=float, help="goodput: TTFT target")
    parser.add_argument("--slo-tpot-ms", type=float, help="goodput: TPOT target")
    parser.add_argument("--label", help="curve name in plots (default: the model, or the sweep directory)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client.benchmark", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="one load level")
    add_load_options(run, many=False)
    run.add_argument("--out", type=Path, help="result JSON")
    run.set_defaults(handler=command_run)

    sweep = commands.add_parser("sweep", help="several load levels against one server")
    add_load_options(sweep, many=True)
    sweep.add_argument("--out-dir", type=Path, required=True, help="one result JSON per load level")
    sweep.set_defaults(handler=command_sweep)

    plot = commands.add_parser("plot", help="Pareto and TPOT charts of sweep directories")
    plot.add_argument("paths", type=Path, nargs="+", help="sweep directories, run files, rate-match outputs")
    plot.add_argument("--out-dir", type=Path, default=Path("plots"))
    plot.set_defaults(handler=command_plot)

    match = commands.add_parser("rate-match", help="context:generation ratio and throughput per worker")
    match.add_argument("--context", type=Path, nargs="+", required=True,
                       help="context-side runs (files or dirs): --osl 1, the generation runs' ISL")
    match.add_argument("--generation", type=Path, nargs="+", required=True, help="generation-side runs (files or dirs)")
    match.add_argument("--ttft-limit-ms", type=float, required=True, help="context runs must keep TTFT p99 within this")
    match.add_argument("--context-workers", type=int,
                       help="context workers that served the context runs (default: the runs' --workers, which "
                            "for a disaggregated preset counts its generation workers too)")
    match.add_argument("--generation-workers", type=int,
                       help="generation workers that served the generation runs (default: the runs' --workers)")
    match.add_argument("--label", default="rate-matched")
    match.add_argument("--out", type=Path, help="JSON that `plot` draws as a curve")
    match.set_defaults(handler=command_rate_match)

    inputs = commands.add_parser("perf-inputs", help="write perf_analyzer --input-data for the ensemble")
    add_workload_options(inputs, num_requests=16)
    inputs.add_argument("--out", type=Path, default=Path("client/data/perf_inputs.json"))
    inputs.set_defaults(handler=command_perf_inputs, warmup_requests=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.handler(args)
    except (BenchmarkError, ModelInterfaceError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
