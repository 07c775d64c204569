"""Joins an engine's KV pool to kv_transfer: the only place that knows both.

The engine sees a pool allocator, block ids and a readiness poll; kv_transfer sees a tensor, a
layout and handles. Settings come from the model's config.pbtxt parameters (`kv_*`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future

import torch

from kv_transfer import (
    KVHandle,
    KVLayout,
    MalformedMessageError,
    TransferAgent,
    TransferConfig,
    allocate_kv_pool,
)
from python_backend_utils.engine.kv_pool import ModelShape
from python_backend_utils.engine.sequence import StartPull
from python_backend_utils.environment import KV_ENV_PREFIX
from python_backend_utils.serving.context_params import ContextPhaseParams, MalformedContextParamsError

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def layout_for(shape: ModelShape, block_size: int, dtype: torch.dtype) -> KVLayout:
    return KVLayout(
        num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        block_size=block_size,
        dtype=_DTYPE_NAMES[dtype],
    )


# TRITON_DISAGG_KV_<FIELD> (e.g. TRITON_DISAGG_KV_BIND_INTERFACE=eth0) overrides the `kv_<field>`
# parameter, so each container of a multi-host deployment sets its own without editing config.pbtxt.


def transfer_config(parameters: dict[str, str], name: str, environ: Mapping[str, str] | None = None,
                    key: bytes | None = None) -> TransferConfig:
    """TransferConfig from `kv_<field>` parameters, each overridden by a non-empty
    TRITON_DISAGG_KV_<FIELD> variable of `environ` (default: os.environ); empty values keep
    kv_transfer's defaults. `key`: the deployment key (the one that signs context_phase_params),
    which then authenticates the agents' control messages too."""
    environ = os.environ if environ is None else environ
    defaults = TransferConfig(name=name)
    values = {}
    for field, default in vars(defaults).items():
        if field in ("name", "allowed_peers", "deployment_key"):
            continue
        source, raw = f"{KV_ENV_PREFIX}{field.upper()}", environ.get(f"{KV_ENV_PREFIX}{field.upper()}", "")
        if raw == "":
            source, raw = f"kv_{field}", parameters.get(f"kv_{field}", "")
        if raw == "":
            continue
        if isinstance(default, bool):
            if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(f"{source}={raw!r}: use true or false")
            values[field] = raw.lower() in ("1", "true", "yes")
        else:
            try:
                values[field] = type(default)(raw)
            except ValueError:
                raise ValueError(f"{source}={raw!r}: expected a {type(default).__name__}") from None
    return TransferConfig(name=name, deployment_key=key, **values)


class KVExchange:
    def __init__(self, config: TransferConfig) -> None:
        self.config = config
        self.layout: KVLayout | None = None
        self.agent: TransferAgent | None = None

    def allocate_pool(self, shape: ModelShape, num_blocks: int, block_size: int, dtype: torch.dtype, device: str):
        """The engine's pool allocator: memory kv_transfer can share with same-host peers."""
        self.layout = layout_for(shape, block_size, dtype)
        return allocate_kv_pool(self.layout, num_blocks, device)

    def attach(self, pool: torch.Tensor) -> None:
        self.agent = TransferAgent(pool, self.layout, self.config)

    def publish(self, request_id: str, block_ids: list[int], num_tokens: int,
                on_release: Callable[[str], None]) -> bytes:
        handle = self.agent.publish(request_id, block_ids, num_tokens,
                                    on_release=lambda released, _reason: on_release(released))
        return handle.to_bytes()

    def revoke(self, request_id: str) -> None:
        self.agent.revoke(request_id)

    def pull_starter(self, handoff: ContextPhaseParams) -> StartPull:
        """For LLMEngine.add_generation_request: start the pull once blocks exist.

        The pull is bounded as a whole (a sender that trickles data is given up on) by the agent,
        which ends it only once nothing writes the blocks: the engine then recomputes the prompt
        into them, or gives them to another request, safely."""
        try:
            handle = KVHandle.from_bytes(handoff.kv_handle)
        except MalformedMessageError as error:  # authentic but unreadable: another kv_transfer version
            raise MalformedContextParamsError(f"context_phase_params holds a KV handle this instance "
                                              f"cannot read ({error})") from None
        needed = self.layout.blocks_for(handoff.num_prompt_tokens)

        def start(block_ids: list[int]) -> Future:  # raises e.g. for layouts that cannot convert: recomputed
            return self.agent.pull(handle, block_ids[:needed],
                                   timeout_s=self.config.response_timeout_s + self.config.transfer_timeout_s)

        return start

    def metrics(self) -> dict:
        return self.agent.metrics.snapshot()

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()
