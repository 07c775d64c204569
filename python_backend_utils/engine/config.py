"""Engine settings, read from a Triton model's config.pbtxt parameters with environment overrides."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from python_backend_utils.cpu_features import AUTO_DTYPE, auto_dtype, auto_dtype_reason, cpu_flags
from python_backend_utils.environment import DEVICE_ENV, MODEL_DIR_ENV

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# "int8": linear weights quantized per output channel at load, activations per row at run time.
WEIGHT_QUANTIZATIONS = ("", "int8")


class ConfigError(ValueError):
    """A setting has a value the engine cannot use."""


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str = ""
    device: str = "cpu"
    dtype: str = AUTO_DTYPE
    kv_cache_dtype: str = ""
    block_size: int = 16
    num_kv_blocks: int = 0
    kv_cache_memory_bytes: int = 1 << 30
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 4096
    max_model_len: int = 0
    num_threads: int = 1
    weight_quantization: str = ""
    # Processes the model is split over (engine/parallel.py): by attention heads and MLP channels, or by layers.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in (AUTO_DTYPE, *DTYPES):
            raise ConfigError(f"dtype={self.dtype!r}: choose {AUTO_DTYPE} or one of {sorted(DTYPES)}")
        if self.kv_cache_dtype and self.kv_cache_dtype not in DTYPES:
            raise ConfigError(f"kv_cache_dtype={self.kv_cache_dtype!r}: choose one of {sorted(DTYPES)}, or leave "
                              "it empty to follow dtype")
        if self.weight_quantization not in WEIGHT_QUANTIZATIONS:
            raise ConfigError(f"weight_quantization={self.weight_quantization!r}: choose one of "
                              f"{[q for q in WEIGHT_QUANTIZATIONS if q]} or leave it empty")
        if self.block_size <= 0 or self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ConfigError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: use 1 (no split) or more")

    @property
    def world_size(self) -> int:
        """Processes the engine runs in: the leader and its ranks."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def resolved_dtype(self) -> str:
        """`dtype`, with auto resolved for this device and this machine's CPU."""
        return auto_dtype(self.device, cpu_flags()) if self.dtype == AUTO_DTYPE else self.dtype

    def describe(self) -> str:
        """The numeric settings as the engine runs them, for the start-up log: auto says what it chose and why."""
        dtype = self.resolved_dtype
        if self.dtype == AUTO_DTYPE:
            dtype += f" (auto: {auto_dtype_reason(self.device, cpu_flags())})"
        weights = ", int8 weights" if self.weight_quantization == "int8" else ""
        return f"dtype {dtype}{weights}, KV cache {self.kv_cache_dtype or self.resolved_dtype}, " \
               f"{self.num_threads} thread(s)"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.resolved_dtype]

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        return DTYPES[self.kv_cache_dtype or self.resolved_dtype]

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> EngineConfig:
        """Build from string-valued settings; unknown keys are left to the caller, empty values mean default."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for name, raw in parameters.items():
            if name not in fields or raw == "":
                continue
            kind = fields[name].type
            try:
                values[name] = int(raw) if kind == "int" else raw
            except ValueError:
                raise ConfigError(f"parameter {name}={raw!r} must be an integer") from None
        if os.environ.get(MODEL_DIR_ENV) and not values.get("model_dir"):
            values["model_dir"] = os.environ[MODEL_DIR_ENV]
        if os.environ.get(DEVICE_ENV):
            values["device"] = os.environ[DEVICE_ENV]
        return cls(**values)
