"""Messages between the engine, the orchestrator and the context/generation models (no torch here).

`context_phase_params` crosses Triton as a UINT8 tensor and may come from outside, so its
decoder checks every length and value and fails with one specific exception.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_MAGIC = b"CPP1"
_HEADER = struct.Struct("<4sIIHI")  # magic, first token, prompt tokens, instance-name length, handle length
MAX_INSTANCE_NAME = 256
MAX_HANDLE_BYTES = 1 << 20


class MalformedContextParamsError(ValueError):
    """context_phase_params is truncated, oversized or not ours."""


@dataclass(frozen=True)
class ContextPhaseParams:
    """What a generation instance needs to continue a request prefilled elsewhere."""

    context_instance: str  # e.g. "context/1": which instance holds the KV
    first_token: int
    num_prompt_tokens: int
    kv_handle: bytes  # kv_transfer's handle, opaque here

    def to_bytes(self) -> bytes:
        name = self.context_instance.encode()
        return _HEADER.pack(_MAGIC, self.first_token, self.num_prompt_tokens, len(name), len(self.kv_handle)) + (
            name + self.kv_handle
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> "ContextPhaseParams":
        if len(data) < _HEADER.size:
            raise MalformedContextParamsError(f"context_phase_params has {len(data)} bytes, fewer than its header")
        magic, first_token, num_prompt_tokens, name_len, handle_len = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise MalformedContextParamsError("context_phase_params was not produced by a context model")
        if name_len > MAX_INSTANCE_NAME or handle_len > MAX_HANDLE_BYTES:
            raise MalformedContextParamsError("context_phase_params declares an oversized field")
        if len(data) != _HEADER.size + name_len + handle_len:
            raise MalformedContextParamsError(
                f"context_phase_params has {len(data)} bytes, its header declares {_HEADER.size + name_len + handle_len}"
            )
        body = data[_HEADER.size :]
        try:
            name = body[:name_len].decode()
        except UnicodeDecodeError:
            raise MalformedContextParamsError("context_phase_params names its instance in invalid UTF-8") from None
        if num_prompt_tokens == 0:
            raise MalformedContextParamsError("context_phase_params describes an empty prompt")
        return cls(name, first_token, num_prompt_tokens, bytes(body[name_len:]))


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]  # produced since the last output for this request
    log_probs: list[float]  # same length, filled when the request asked for them
    finished: bool
    finish_reason: str | None  # "length" | "stop" | "abort" | None (context-only: KV held for a pull)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    kv_block_ids: list[int] | None = None  # context-only: the blocks holding the prompt's KV
