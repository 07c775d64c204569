"""The transfer handle: the opaque part of the context phase parameters."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .errors import MalformedMessageError
from .layout import KVLayout, SharedPool
from .liveness import ProcessIdentity
from .wire import Reader, Writer

SECRET_BYTES = 16


@dataclass(frozen=True)
class KVHandle:
    """Everything a generation agent needs to pull one request's KV from one sender agent.

    The secret is a per-request random capability: whoever holds the handle may pull, nobody
    else can. ``expires_at`` is wall-clock time (the receiver may be on another host); the
    sender enforces its own monotonic deadline. ``shared_pool`` says where a receiver on the
    same host can map the sender's pool. Decode with `from_bytes` from bytes, a memoryview or a
    numpy uint8 array (a Triton UINT8 tensor).
    """

    agent_name: str
    agent_address: bytes = field(repr=False)
    agent_process: ProcessIdentity = field(repr=False)
    request_id: str
    block_ids: tuple[int, ...] = field(repr=False)
    num_tokens: int
    layout: KVLayout
    secret: bytes = field(repr=False)
    expires_at: float
    max_message_bytes: int
    shared_pool: SharedPool | None = field(default=None, repr=False)

    MAGIC = b"KVH1"

    def expired(self) -> bool:
        return time.time() >= self.expires_at

    def to_bytes(self) -> bytes:
        w = Writer().text(self.agent_name).blob(self.agent_address).identity(self.agent_process)
        w.text(self.request_id).u32s(self.block_ids).u64(self.num_tokens).layout(self.layout)
        w.blob(self.secret).f64(self.expires_at).u64(self.max_message_bytes).shared_pool(self.shared_pool)
        return w.frame(self.MAGIC)

    @classmethod
    def from_bytes(cls, data) -> KVHandle:
        r = Reader(memoryview(data).cast("B"), cls.MAGIC)
        handle = cls(agent_name=r.text(), agent_address=r.blob(), agent_process=r.identity(),
                     request_id=r.text(), block_ids=tuple(r.u32s()), num_tokens=r.u64(), layout=r.layout(),
                     secret=r.blob(), expires_at=r.f64(), max_message_bytes=r.u64(), shared_pool=r.shared_pool())
        r.done()
        if handle.num_tokens <= 0 or len(handle.block_ids) != handle.layout.blocks_for(handle.num_tokens):
            raise MalformedMessageError(
                f"handle lists {len(handle.block_ids)} blocks for {handle.num_tokens} tokens "
                f"of block size {handle.layout.block_size}")
        if len(handle.secret) != SECRET_BYTES or not handle.agent_address or handle.max_message_bytes <= 0:
            raise MalformedMessageError("handle has an invalid secret, address or message limit")
        if not math.isfinite(handle.expires_at):  # NaN would never expire, nor equal itself
            raise MalformedMessageError(f"handle has a non-finite expiry {handle.expires_at}")
        return handle
