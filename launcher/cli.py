"""`disagg-serve`: run tritonserver on our model repository until interrupted."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import sys
import tempfile
from pathlib import Path

from launcher.openai_process import FrontendStartError, OpenAIFrontend, frontend_target
from launcher.placement import ENGINE_MODELS, WHOLE_DEPLOYMENT_MODES, place_instances
from launcher.repository import RenderError, Setting, apply_settings, render_repository
from launcher.server import DEFAULT_MODEL_REPOSITORY, ServerStartError, TritonServer
from launcher.stopping import Stopped, StopSignals
from launcher.supervisor import ORCHESTRATOR_MODEL, OrchestratorWatch, Supervisor
from python_backend_utils.cpu_features import AUTO_DTYPE, auto_dtype, auto_dtype_reason, cpu_flags
from python_backend_utils.environment import API_KEY_ENV
from python_backend_utils.orchestration.deployment import DeploymentError

# What each mode loads. The orchestrator reaches context and generation through BLS, which
# Triton does not count as a dependency, so they are named here.
MODES = {
    "disaggregated": ["ensemble", "ensemble_unary", "context", "generation"],
    "aggregated": ["ensemble_aggregated", "aggregated"],
    "both": ["ensemble", "ensemble_unary", "context", "generation", "ensemble_aggregated", "aggregated"],
    # Scale-out: one server per role. The orchestrator server has no engine of its own; its
    # deployment file lists the others' gRPC endpoints as `urls`.
    "orchestrator": ["ensemble", "ensemble_unary"],
    "context-server": ["context"],
    "generation-server": ["generation"],
}


# The commands beside serving (no command): name -> (what it does, the module whose main() runs it).
COMMANDS = {
    "plan": ("the best context:generation split for SLOs and a request rate (planner/plan.py); with --live, "
             "from a running server's metrics (planner/live.py)", "planner.plan"),
    "study": ("no server: aggregated against every context:generation split through the simulator "
              "(planner/study.py)", "planner.study_report"),
    "validate-simulator": ("no server: replays the measured benchmark runs through planner.simulator "
                           "(planner/validate.py)", "planner.validate"),
}


def version() -> str:
    return importlib.metadata.version("triton-disagg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="disagg-serve", description=__doc__ + " With a command, runs that command instead (its own "
        "options: disagg-serve COMMAND --help).")
    commands = parser.add_subparsers(title="commands", metavar="[COMMAND]", dest="command")
    for name, (text, _) in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY,
                        help="the Triton model repository to serve (default: %(default)s)")
    parser.add_argument(
        "--deployment",
        type=Path,
        metavar="FILE",
        help="a disagg_config.yaml: serve a copy of the model repository with one version of "
        "`context` / `generation` per instance it names, and this file as the orchestrator's deployment",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MODEL.KEY=VALUE",
        dest="settings",
        help="serve a copy of the model repository with this config.pbtxt parameter changed, or "
        "MODEL.instance_count=N (repeatable), e.g. --set aggregated.cpu_cores='0;1'",
    )
    parser.add_argument("--model-dir",
                        help="Hugging Face checkpoint directory to serve (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="overrides the device in config.pbtxt")
    flags = cpu_flags()
    parser.add_argument(
        "--dtype", choices=[AUTO_DTYPE, "float32", "bfloat16"],
        help=f"every engine's dtype, overriding config.pbtxt's (default there: {AUTO_DTYPE}, which is "
        f"{auto_dtype('cpu', flags)} here: {auto_dtype_reason('cpu', flags)}; auto is bfloat16 on CUDA and on CPUs "
        "with AMX-BF16 or AVX512-BF16, float32 on other CPUs). The KV cache follows unless kv_cache_dtype is set",
    )
    parser.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="load only this model and what it depends on (repeatable; replaces --mode's list)",
    )
    parser.add_argument(
        "--mode",
        choices=sorted(MODES),
        default="disaggregated",
        help="disaggregated: `ensemble` runs context and generation instances (default); "
        "aggregated: `ensemble_aggregated` runs both phases in one engine; both: everything; "
        "orchestrator / context-server / generation-server: one role of a deployment over several servers "
        "(the orchestrator's deployment file names the others under urls)",
    )
    parser.add_argument("--host", default="0.0.0.0",
                        help="the address every port binds to (default: all interfaces); 127.0.0.1: this machine only")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--openai-port", type=int, default=9000,
                        help="port of the OpenAI-compatible API (/v1/chat/completions, ...); 0 turns it off")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model name of the OpenAI API (default: the checkpoint directory's name)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"the OpenAI API answers /v1 requests only with 'Authorization: Bearer KEY', others "
                        f"a 401 (default: ${API_KEY_ENV}; none: open to all)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    return parser.parse_args(argv)


def banner(server: TritonServer, ensemble: str, frontend: OpenAIFrontend | None = None) -> str:
    urls = server.urls
    prompt = '{"text_input": "The capital of France is", "max_tokens": 16}'
    openai = []
    if frontend is not None:
        chat = json.dumps({"model": frontend.model_id, "messages": [{"role": "user", "content": "Hi"}]})
        openai = [f"  OpenAI   {frontend.url}/v1",
                  f"  curl -s {frontend.url}/v1/chat/completions -H 'Content-Type: application/json' -d '{chat}'"]
    return "\n".join(
        [
            "tritonserver is ready",
            f"  HTTP     http://{urls.http}",
            f"  gRPC     {urls.grpc}",
            f"  metrics  http://{urls.metrics}/metrics",
            *openai[:1],
            "try:",
            f"  curl -s http://{urls.http}/v2/models/{ensemble}/generate -d '{prompt}'",
            f'  python -m client.generate --url {urls.grpc} --stream "Tell me a story"',
            *openai[1:],
            "Ctrl-C stops the server.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in COMMANDS:  # the command parses its own options
        module = COMMANDS[argv[0]][1]
        if argv[0] == "plan" and "--live" in argv:  # the live planner: planner/live.py
            module, argv = "planner.live", [arg for arg in argv if arg != "--live"]
        return importlib.import_module(module).main(argv[1:])
    args = parse_args(argv)
    stop_signals = StopSignals()  # before any child exists
    with tempfile.TemporaryDirectory(prefix="disagg-serve-") as workdir:
        try:
            repository = prepare_repository(args, Path(workdir) / "model_repository")
        except (OSError, DeploymentError, RenderError) as error:
            print(f"disagg-serve: {error}", file=sys.stderr)
            return 2
        return serve(args, repository, stop_signals)


def prepare_repository(args: argparse.Namespace, rendered: Path) -> Path:
    """The repository to serve: the given one, or a copy at `rendered` shaped by --deployment, --set,
    --dtype and the engine instances' placement (launcher/placement.py)."""
    models = args.load_model or MODES[args.mode]
    settings = tuple(Setting.parse(text) for text in args.settings)
    if args.dtype:
        settings += tuple(Setting(model, "dtype", args.dtype) for model in ENGINE_MODELS if model in models)
    repository = args.model_repository
    if args.deployment is not None or settings:
        render_repository(repository, rendered, args.deployment, settings)
        repository = rendered
    if args.mode not in WHOLE_DEPLOYMENT_MODES or args.load_model:
        return repository
    placement = place_instances(repository, models, settings)
    print(f"disagg-serve: {placement.describe()}", flush=True)
    if placement.cores:
        if repository != rendered:
            render_repository(repository, rendered)
            repository = rendered
        apply_settings(repository, placement.settings())
    return repository


def serve(args: argparse.Namespace, repository: Path, stop_signals: StopSignals) -> int:
    models = args.load_model or MODES[args.mode]
    server = TritonServer(
        repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.host,
        models=models,
        model_dir=args.model_dir,
        device=args.device,
        ready_timeout_s=args.ready_timeout,
        check_stop=stop_signals.check,
    )
    target = frontend_target(models)
    frontend = None
    if args.openai_port and target is not None:
        frontend = OpenAIFrontend(triton_grpc_url=server.urls.grpc, triton_model=target, port=args.openai_port,
                                  model_dir=args.model_dir, host=args.host, served_model_name=args.served_model_name,
                                  api_key=args.api_key, check_stop=stop_signals.check)
    try:
        server.start()
        if frontend is not None:
            frontend.start()
        print(banner(server, "ensemble_aggregated" if args.mode == "aggregated" else "ensemble", frontend),
              flush=True)
        watch = OrchestratorWatch(repository, expected=bool({"ensemble", ORCHESTRATOR_MODEL} & set(models)))
        return Supervisor(server, stop_signals, watch=watch).run()
    except (ServerStartError, FrontendStartError) as error:
        print(error, file=sys.stderr)
        return 1
    except Stopped as stopped:
        return stopped.exit_status
    finally:
        stop(server, frontend)


def stop(server: TritonServer, frontend: OpenAIFrontend | None) -> None:
    """The one stop path: both children are asked to stop at once, then each is waited for and
    killed with its process group after its timeout, and the server's /dev/shm regions removed.
    Stop signals only set a flag (launcher/stopping.py), so nothing cuts this short."""
    children = [child for child in (frontend, server) if child is not None]
    for child in children:
        child.terminate()
    for child in children:
        child.stop()


if __name__ == "__main__":
    sys.exit(main())
