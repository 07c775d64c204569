"""`python -m openai_frontend`: serve the OpenAI API for a running tritonserver (disagg-serve starts it)."""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from openai_frontend.app import create_app
from openai_frontend.served_model import ServedModel
from openai_frontend.triton_client import TritonGenerator
from python_backend_utils.environment import API_KEY_ENV, CheckpointNotFoundError, resolve_model_dir

DEFAULT_PORT = 9000  # Triton's own OpenAI frontend's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m openai_frontend", description=__doc__)
    parser.add_argument("--triton-url", default="localhost:8001", help="the tritonserver's gRPC endpoint")
    parser.add_argument("--triton-model", default="disaggregated_serving_bls",
                        help="the ensemble's middle step to call: disaggregated_serving_bls, or aggregated")
    parser.add_argument("--model-dir", help="the checkpoint the server runs (default: as the server resolves it)")
    parser.add_argument("--served-model-name", help="the model name clients send (default: the checkpoint's name)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = ServedModel.load(resolve_model_dir(args.model_dir), args.served_model_name)
    except CheckpointNotFoundError as error:
        print(f"openai_frontend: {error}", file=sys.stderr)
        return 2
    app = create_app(model, TritonGenerator(args.triton_url, args.triton_model), os.environ.get(API_KEY_ENV) or None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
