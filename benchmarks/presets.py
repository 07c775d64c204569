"""Benchmark presets: aggregated and disaggregated deployments with the same cores, one sweep each.

A worker is one pinned core here (one GPU on a GPU machine, where `--no-pin` leaves placement
to the devices). `aggregated` runs `--instances` engines (default 1) over N cores, each on a block
of adjacent cores (on 2 cores: one instance with 2 threads, as `llama-server -t 2`);
`disaggregated` runs C context and G generation instances, on cores 0..C-1 and C..C+G-1. Each
engine runs one thread per core it has (num_threads left empty, serving/placement.py). The
server, tokenizers and orchestrator are not pinned: they are the same on both sides except the
orchestrator, which is what is measured.

    .venv/bin/python -m benchmarks.presets aggregated --workers 2 --out-dir results/mixed/aggregated \\
        -- --dataset mixed --request-rate 0.1 0.2 --num-requests 16
    .venv/bin/python -m benchmarks.presets disaggregated --context-workers 1 --generation-workers 1 \\
        --out-dir results/mixed/disaggregated -- --dataset mixed --request-rate 0.1 0.2 --num-requests 16

Everything after `--` goes to `client.benchmark sweep` (the URL, model and worker count are
filled in). The server's log is kept next to the results.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from client import benchmark
from launcher import TritonServer
from launcher.cli import MODES
from launcher.placement import split_cores
from launcher.ports import free_server_ports
from launcher.repository import Setting, render_repository
from launcher.server import DEFAULT_MODEL_REPOSITORY


def preset_settings(args: argparse.Namespace) -> tuple[list[str], str | None, int]:
    """(settings, deployment YAML or None, workers) for the chosen preset."""
    if args.preset == "aggregated":
        settings = [Setting("aggregated", "instance_count", str(args.instances))]
        if args.pin:
            settings += split_cores(range(args.workers), {"aggregated": args.instances}).settings()
        return [f"{s.model}.{s.key}={s.value}" for s in settings], None, args.workers
    contexts, generations = args.context_workers, args.generation_workers
    settings = []
    if args.pin:
        settings += [
            f"context.cpu_cores={';'.join(str(core) for core in range(contexts))}",
            f"generation.cpu_cores={';'.join(str(contexts + k) for k in range(generations))}",
        ]
    deployment = (
        f"context_servers:\n  num_instances: {contexts}\n  router: {{type: kv_cache_aware}}\n"
        f"generation_servers:\n  num_instances: {generations}\n"
        "  router: {type: load_balancing, load_metric: tokens}\n"
    )
    return settings, deployment, contexts + generations


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, sweep_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=["aggregated", "disaggregated"])
    parser.add_argument("--workers", type=int, default=2, help="aggregated: cores")
    parser.add_argument("--instances", type=int, default=1,
                        help="aggregated: engine instances sharing out the cores (at most --workers)")
    parser.add_argument("--context-workers", type=int, default=1)
    parser.add_argument("--generation-workers", type=int, default=1)
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="leave the engines unpinned")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(ours)
    if not 1 <= args.instances <= args.workers:
        parser.error(f"--instances {args.instances}: give 1 to --workers ({args.workers})")

    settings, deployment, workers = preset_settings(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="preset-") as workdir:
        repository = Path(workdir) / "model_repository"
        deployment_file = None
        if deployment is not None:
            deployment_file = Path(workdir) / "deployment.yaml"
            deployment_file.write_text(deployment)
        render_repository(DEFAULT_MODEL_REPOSITORY, repository, deployment_file, tuple(map(Setting.parse, settings)))
        mode = "aggregated" if args.preset == "aggregated" else "disaggregated"
        server = TritonServer(
            repository,
            **free_server_ports(),
            models=MODES[mode],
            log_file=args.out_dir / "server.log",
        )
        print(f"{args.preset}: {workers} workers, settings {' '.join(settings) or 'none'}", flush=True)
        try:
            server.start()
            model = "ensemble_aggregated" if mode == "aggregated" else "ensemble"
            return benchmark.main(["sweep", "--url", server.urls.grpc, "--model", model, "--workers", str(workers),
                                   "--label", args.preset, "--out-dir", str(args.out_dir), *sweep_args])
        finally:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
