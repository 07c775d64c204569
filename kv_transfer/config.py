"""Settings of a transfer agent (the seed's TRTLLM_* environment variables, as typed fields)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

MIN_KEY_BYTES = 16


def _default_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class TransferConfig:
    """Defaults suit one host with a few context and generation instances.

    name: how handles name this agent and what peers' ``allowed_peers`` match.
    bind_interface: the network interface UCX may use (UCX_NET_DEVICES): loopback by default, so
        nothing off this host can reach the agent; set e.g. "eth0" for a multi-host deployment.
    use_shared_memory: on one host, read the sender's pool directly (it must come from
        `allocate_kv_pool`): a single copy, no staging, and a sender dying mid-read cannot harm the
        reader. Off, or when the pool cannot be mapped, the data goes through UCX like across hosts.
        On the sender, off keeps its pool out of its handles.
    allowed_peers: agent names this agent pulls from and serves; None allows any. Names are
        self-declared: the per-request secret, not the name, is what protects the KV.
    handle_ttl_s: a published request unpulled this long is released (reason "expired").
    max_tokens_in_buffer: staging capacity, in tokens of this agent's own layout. Staging is used
        only for transfers through UCX when a copy is unavoidable (layout conversion, a head
        subset, a non-CPU pool, or zero_copy off); sending and receiving get one buffer each,
        allocated at first use. Transfers are cut into messages (and shared-memory reads into
        steps) of at most a quarter of it, so that several are in flight.
    max_concurrent_sends: pulls this agent serves at once; later ones wait their turn.
    zero_copy: through UCX, send and receive straight from/into the pool when the layouts allow
        (TRTLLM_TRY_ZCOPY_FOR_KVCACHE_TRANSFER; on by default here, as it is the fast path).
    parallel_receive: a pull from several senders (e.g. TP2 -> TP1) receives from all at once,
        instead of one after the other (TRTLLM_ENABLE_KVCACHE_RECEIVE_PARALLEL).
    response_timeout_s: how long a sender has to answer a pull request before it is unreachable.
    transfer_timeout_s: the longest a transfer through UCX may go without a message completing,
        on both sides; also bounds how long an accepted pull may wait for a send slot, and how long
        a same-host reader may hold the sender's blocks.
    copy_threads: threads that copy a same-host read. A contiguous run of 4 MiB or more is split
        among them (kv_transfer/README.md has the measured gain). Where a process is pinned to one
        core, its copy threads share that core.
    poll_interval_s / idle_poll_interval_s: the service thread's polling period while transfers
        are active / when idle. The Python ucxx API offers no completion callbacks, so the
        service thread polls: a shorter period answers sooner and costs more of a core.
    deployment_key: shared by the agents of one deployment (bytes, or text taken as UTF-8); set,
        every control message carries an HMAC-SHA256 under it, and messages without a valid one
        are dropped unread. None: control messages are unauthenticated (one trusted host).
    max_endpoints: UCX endpoints kept open to peers; the least recently used idle one is closed
        beyond it (endpoints that transfers are using are kept regardless).
    """

    name: str = field(default_factory=_default_name)
    bind_interface: str = "lo"
    use_shared_memory: bool = True
    allowed_peers: frozenset[str] | None = None
    handle_ttl_s: float = 60.0
    max_tokens_in_buffer: int = 2048
    max_concurrent_sends: int = 4
    zero_copy: bool = True
    parallel_receive: bool = True
    response_timeout_s: float = 5.0
    transfer_timeout_s: float = 30.0
    copy_threads: int = 2
    poll_interval_s: float = 0.0002
    idle_poll_interval_s: float = 0.001
    deployment_key: bytes | str | None = field(default=None, repr=False)  # a str is stored as its UTF-8
    max_endpoints: int = 256

    def __post_init__(self) -> None:
        if self.allowed_peers is not None:
            object.__setattr__(self, "allowed_peers", frozenset(self.allowed_peers))
        if isinstance(self.deployment_key, str):
            object.__setattr__(self, "deployment_key", self.deployment_key.encode())
        if self.deployment_key is not None and len(self.deployment_key) < MIN_KEY_BYTES:
            raise ValueError(f"TransferConfig.deployment_key has {len(self.deployment_key)} bytes; "
                             f"use at least {MIN_KEY_BYTES}")
        for name in ("max_tokens_in_buffer", "max_concurrent_sends", "copy_threads", "max_endpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransferConfig.{name} must be >= 1")
        for name in ("handle_ttl_s", "response_timeout_s", "transfer_timeout_s",
                     "poll_interval_s", "idle_poll_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TransferConfig.{name} must be > 0")

    def allows(self, peer_name: str) -> bool:
        return self.allowed_peers is None or peer_name in self.allowed_peers
