"""The pool an agent registered, as its sender and receiver both see it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .layout import KVLayout, SharedPool, shared_pool_of
from .liveness import ProcessIdentity


@dataclass(frozen=True, eq=False)
class LocalPool:
    """This agent's pool, registered once; it must stay allocated for the agent's life."""

    tensor: torch.Tensor
    layout: KVLayout
    host_bytes: np.ndarray | None  # its bytes, when it is in host memory (UCX sends and receives them)
    shared: SharedPool | None  # where same-host peers can map it, when they may
    process: ProcessIdentity  # its owner, this process: peers map `shared` through it and watch it
    max_message_bytes: int  # the largest message sent from or received into it

    @classmethod
    def register(cls, tensor: torch.Tensor, layout: KVLayout, *, share: bool, max_message_bytes: int) -> LocalPool:
        host_bytes = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.device.type == "cpu" else None
        return cls(tensor, layout, host_bytes, shared_pool_of(tensor) if share else None,
                   ProcessIdentity.current(), max_message_bytes)

    @property
    def on_host(self) -> bool:
        return self.host_bytes is not None

    @property
    def num_blocks(self) -> int:
        return self.tensor.shape[0]
