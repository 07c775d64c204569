"""KV cache transfer between context and generation instances, over UCX (ucxx).

Knows nothing of Triton or of the engine: it moves described memory between processes.
See README.md in this directory for the protocol, the settings and what was measured.
"""

import os

# Set before any submodule imports ucxx, as UCX reads it at import; `import kv_transfer.x` runs this file first.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

from .agent import PullFuture, PullResult, ReleaseReason, TransferAgent
from .config import TransferConfig
from .errors import (
    AgentClosedError,
    HandleExpiredError,
    KVTransferError,
    LayoutMismatchError,
    MalformedMessageError,
    PeerLostError,
    PeerNotAllowedError,
    PeerUnreachableError,
    PullRefusedError,
    TransferTimeoutError,
)
from .handle import KVHandle
from .layout import KVLayout, allocate_kv_pool

__all__ = [
    "AgentClosedError",
    "HandleExpiredError",
    "KVHandle",
    "KVLayout",
    "KVTransferError",
    "LayoutMismatchError",
    "MalformedMessageError",
    "PeerLostError",
    "PeerNotAllowedError",
    "PeerUnreachableError",
    "PullFuture",
    "PullRefusedError",
    "PullResult",
    "ReleaseReason",
    "TransferAgent",
    "TransferConfig",
    "TransferTimeoutError",
    "allocate_kv_pool",
]
