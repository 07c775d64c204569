"""Environment variables and cache paths every layer reads: one place, so that nothing imports a
tool (or the engine) for a constant."""

from __future__ import annotations

import os
from pathlib import Path

MODEL_DIR_ENV = "TRITON_DISAGG_MODEL_DIR"
DEVICE_ENV = "TRITON_DISAGG_DEVICE"
CACHE_DIR_ENV = "TRITON_DISAGG_CACHE"
KEY_FILE_ENV = "TRITON_DISAGG_KV_KEY_FILE"
DEPLOYMENT_ENV = "TRITON_DISAGG_DEPLOYMENT"
KV_ENV_PREFIX = "TRITON_DISAGG_KV_"  # kv_transfer settings: TRITON_DISAGG_KV_<FIELD>
API_KEY_ENV = "TRITON_DISAGG_API_KEY"  # the OpenAI API's key: in the environment, as a command line is public (ps)
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class CheckpointNotFoundError(RuntimeError):
    """No Hugging Face checkpoint where the settings point."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "triton-disagg")


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def resolve_model_dir(configured: str | None = None) -> Path:
    """The checkpoint a model instance loads: explicit setting, then the environment, then the default."""
    chosen = configured or os.environ.get(MODEL_DIR_ENV)
    path = Path(chosen).expanduser() if chosen else default_model_dir()
    if not (path / "config.json").is_file():
        hint = (
            "run `make model` (or `disagg-prepare-model`) to build the default model"
            if not chosen
            else f"point {MODEL_DIR_ENV} or the model_dir parameter at a Hugging Face checkpoint directory"
        )
        raise CheckpointNotFoundError(f"no Hugging Face checkpoint at {path}: {hint}")
    return path
