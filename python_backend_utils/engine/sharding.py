"""Which part of the model each rank of a parallel engine holds (engine/parallel.py runs them).

Tensor parallelism gives each rank some attention heads (each KV head with its whole group of
query heads) and some MLP channels of every layer; pipeline parallelism gives each rank (stage) a
run of whole layers. A count that does not divide is split unevenly: the default model's 3 KV
heads over 2 ranks are 2 + 1, its 30 layers over 4 stages 8 + 8 + 7 + 7.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_backend_utils.engine.config import ConfigError, EngineConfig


@dataclass(frozen=True)
class Shard:
    """What one rank holds: [start, stop) of the layers, and of each layer's query heads, KV heads and MLP channels."""

    rank: int
    size: int
    layers: tuple[int, int]
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    splits_heads: bool  # tensor parallel: each layer's output is the sum of every rank's

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def is_pipeline_stage(self) -> bool:
        return self.size > 1 and not self.splits_heads


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of each part; the first `total % parts` parts get one more."""
    bounds, start = [], 0
    for part in range(parts):
        stop = start + total // parts + (1 if part < total % parts else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def model_shards(num_layers: int, num_heads: int, num_kv_heads: int, intermediate_size: int,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> list[Shard]:
    """Every rank's shard, the leader's first."""
    if tensor_parallel_size > 1 and pipeline_parallel_size > 1:
        raise ConfigError("tensor_parallel_size and pipeline_parallel_size cannot both exceed 1 yet: choose one")
    if tensor_parallel_size > num_kv_heads:
        raise ConfigError(f"tensor_parallel_size={tensor_parallel_size} exceeds the model's {num_kv_heads} KV heads: "
                          f"use at most {num_kv_heads}")
    if pipeline_parallel_size > num_layers:
        raise ConfigError(f"pipeline_parallel_size={pipeline_parallel_size} exceeds the model's {num_layers} layers")
    if pipeline_parallel_size > 1:
        return [Shard(rank, pipeline_parallel_size, layers, (0, num_heads), (0, num_kv_heads),
                      (0, intermediate_size), splits_heads=False)
                for rank, layers in enumerate(split(num_layers, pipeline_parallel_size))]
    group, size = num_heads // num_kv_heads, tensor_parallel_size
    return [Shard(rank, size, (0, num_layers), (kv_start * group, kv_stop * group), (kv_start, kv_stop), channels,
                  splits_heads=size > 1)
            for rank, ((kv_start, kv_stop), channels)
            in enumerate(zip(split(num_kv_heads, size), split(intermediate_size, size)))]


def shard_for(text_config, config: EngineConfig, rank: int) -> Shard:
    """Rank `rank`'s shard of the model a transformers (text) config describes."""
    return model_shards(text_config.num_hidden_layers, text_config.num_attention_heads,
                        text_config.num_key_value_heads, text_config.intermediate_size,
                        config.tensor_parallel_size, config.pipeline_parallel_size)[rank]


def split_cores(cores: frozenset[int] | None, size: int) -> list[frozenset[int] | None]:
    """The instance's cores dealt out to its ranks in contiguous runs; None (unpinned) where too few are given."""
    if not cores or len(cores) < size:
        return [None] * size
    ordered = sorted(cores)
    return [frozenset(ordered[start:stop]) for start, stop in split(len(ordered), size)]
