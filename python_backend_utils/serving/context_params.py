"""Context-phase params: what a context instance hands a generation instance (no torch here).

`context_phase_params` crosses Triton as a UINT8 tensor, and anyone who can reach the server can
send it to `generation`. Its KV handle names a process and a UCX address that the generation
instance will connect to, so the params are authenticated: the context instance appends an
HMAC-SHA256 under the deployment key (shared by the instances of one deployment, never by
clients), bound to the prompt the KV was computed for, and the generation instance verifies it
before it reads anything in the body, let alone connects anywhere. Every length and value is
checked too, and every failure is one specific exception.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from python_backend_utils.environment import KEY_FILE_ENV
from python_backend_utils.errors import InvalidRequestError

_MAGIC = b"CPP2"
_HEADER = struct.Struct("<4sIIHI")  # magic, first token, prompt tokens, instance-name length, handle length
_TAG_BYTES = hashlib.sha256().digest_size
_DOMAIN = b"triton-disagg context_phase_params v2\0"  # a key reused elsewhere cannot sign these
MAX_INSTANCE_NAME = 256
MAX_HANDLE_BYTES = 1 << 20

KEY_FILE_PARAMETER = "kv_key_file"  # config.pbtxt parameter; wins over the environment
MIN_KEY_BYTES = 32


class MalformedContextParamsError(InvalidRequestError):
    """context_phase_params is truncated, oversized or not ours."""


class ForgedContextParamsError(MalformedContextParamsError):
    """context_phase_params fails authentication: forged, altered, made under another deployment's
    key, or computed for another prompt."""


class DeploymentKeyError(RuntimeError):
    """The deployment key that authenticates context_phase_params is missing or unusable."""


def load_deployment_key(parameters: Mapping[str, str] | None = None,
                        environ: Mapping[str, str] = os.environ) -> bytes:
    """The deployment key: the file named by the `kv_key_file` parameter, else by TRITON_DISAGG_KV_KEY_FILE.

    Surrounding whitespace is dropped, so `openssl rand -hex 32 > key` works as well as raw bytes.
    """
    path = (parameters or {}).get(KEY_FILE_PARAMETER) or environ.get(KEY_FILE_ENV)
    if not path:
        raise DeploymentKeyError(
            f"no key to authenticate context_phase_params: set {KEY_FILE_ENV} (or the {KEY_FILE_PARAMETER} "
            f"parameter) to a file holding at least {MIN_KEY_BYTES} secret bytes, the same file for every "
            "context and generation instance of the deployment (disagg-serve creates one per start)"
        )
    try:
        key = Path(path).read_bytes().strip()
    except OSError as error:
        raise DeploymentKeyError(f"cannot read the deployment key file {path}: {error.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise DeploymentKeyError(f"the deployment key in {path} has {len(key)} bytes; use at least {MIN_KEY_BYTES}")
    return key


def _tag(key: bytes, signed: bytes | memoryview, prompt_ids: Sequence[int]) -> bytes:
    mac = hmac.new(key, _DOMAIN, hashlib.sha256)
    mac.update(signed)
    mac.update(np.asarray(prompt_ids, dtype="<i8").tobytes())
    return mac.digest()


@dataclass(frozen=True)
class ContextPhaseParams:
    """What a generation instance needs to continue a request prefilled elsewhere."""

    context_instance: str  # e.g. "context/1": which instance holds the KV
    first_token: int
    num_prompt_tokens: int
    kv_handle: bytes  # kv_transfer's handle, opaque here

    def to_bytes(self, key: bytes, prompt_ids: Sequence[int]) -> bytes:
        """Encoded and signed for the prompt `prompt_ids` (whose KV the handle holds)."""
        name = self.context_instance.encode()
        signed = _HEADER.pack(_MAGIC, self.first_token, self.num_prompt_tokens, len(name), len(self.kv_handle))
        signed += name + self.kv_handle
        return signed + _tag(key, signed, prompt_ids)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, key: bytes, prompt_ids: Sequence[int]) -> ContextPhaseParams:
        """Decode params sent with the prompt `prompt_ids`; authenticity is checked before the body is read."""
        data = memoryview(data).cast("B")
        if len(data) < _HEADER.size + _TAG_BYTES:
            raise MalformedContextParamsError(
                f"context_phase_params has {len(data)} bytes, fewer than its header and authentication tag")
        magic, first_token, num_prompt_tokens, name_len, handle_len = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise MalformedContextParamsError(
                "context_phase_params was not produced by a context model of this version")
        if name_len > MAX_INSTANCE_NAME or handle_len > MAX_HANDLE_BYTES:
            raise MalformedContextParamsError("context_phase_params declares an oversized field")
        signed_len = _HEADER.size + name_len + handle_len
        if len(data) != signed_len + _TAG_BYTES:
            raise MalformedContextParamsError(
                f"context_phase_params has {len(data)} bytes, its header declares {signed_len + _TAG_BYTES}")
        if not hmac.compare_digest(_tag(key, data[:signed_len], prompt_ids), data[signed_len:]):
            raise ForgedContextParamsError(
                "context_phase_params failed authentication: they were not produced by a context instance of "
                "this deployment for this prompt (forged, altered, or sent with other input_ids)")
        body = data[_HEADER.size:signed_len]
        try:
            name = bytes(body[:name_len]).decode()
        except UnicodeDecodeError:
            raise MalformedContextParamsError("context_phase_params names its instance in invalid UTF-8") from None
        if num_prompt_tokens == 0 or num_prompt_tokens != len(prompt_ids):
            raise MalformedContextParamsError(
                f"context_phase_params covers {num_prompt_tokens} prompt tokens, input_ids holds {len(prompt_ids)}")
        return cls(name, first_token, num_prompt_tokens, bytes(body[name_len:]))
