"""The UCX side of an agent: its worker, cached endpoints, control messages and messages UCX still holds.

Control messages are ucxx tagged messages: its Python API has no memory registration, remote keys
or RMA get, so a pull is a request and a response (see sender.py and receiver.py). Every endpoint
has UCX error handling on, so that a dead peer is an error, never an abort (shared_read.py says
what that costs). Control messages are sealed with the deployment key, if any, on the way out and
checked on the way in (wire.py). Endpoints are cached, at most `max_endpoints` of them beyond
those in use. Used by the service thread only.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Set
from dataclasses import dataclass

import numpy as np
import ucxx._lib.libucxx as ucx_api
from ucxx._lib.arr import Array

from .config import TransferConfig
from .errors import MalformedMessageError, UnauthenticatedMessageError
from .metrics import TransferMetrics
from .staging import Staging, StagingArena
from .wire import (
    CONTROL_TAG,
    MAX_CONTROL_BYTES,
    ControlMessage,
    check_worker_address,
    decode_control,
    seal,
    unseal,
)

log = logging.getLogger(__name__)

# Messages of one transfer in flight at once: enough to keep the progress thread busy between polls.
MESSAGES_IN_FLIGHT = 16
_MAX_CONTROL_PER_STEP = 64
EXPIRED_FRAMES_KEPT = 1024  # control frames are a few hundred bytes to a few KiB


@dataclass(eq=False)
class Message:
    """A message being sent or received; holds its buffer until UCX is done with it."""

    request: ucx_api.UCXRequest
    buffer: np.ndarray
    nbytes: int
    first_block: int = 0
    staged_at: int | None = None


class Transport:
    """One UCX worker, with its progress thread, and what the agent has in flight on it."""

    def __init__(self, config: TransferConfig, metrics: TransferMetrics, staging: Staging,
                 in_use: Callable[[], Set[bytes]]) -> None:
        """`in_use`: the addresses of the peers that transfers under way use, whose endpoints stay open."""
        # USE_MT_MUTEX: a thread calling into UCX while the progress thread holds the worker sleeps
        # instead of spinning (on 2 cores, spinning took a core from the transfer).
        # TCP segments of 1 MiB instead of 8 KiB: about 3x the throughput for large messages.
        self.context = ucx_api.UCXContext(
            config_dict={"NET_DEVICES": config.bind_interface, "USE_MT_MUTEX": "y",
                         "TCP_TX_SEG_SIZE": "1m", "TCP_RX_SEG_SIZE": "1m"},
            feature_flags=(ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP))
        self._worker = ucx_api.UCXWorker(self.context)
        self._worker.start_progress_thread(polling_mode=False, epoll_timeout=1)
        self.address: bytes = self._worker.address.tobytes()
        self._metrics = metrics
        self._staging = staging
        self._key = config.deployment_key
        self._max_endpoints = config.max_endpoints
        self._in_use = in_use
        self._endpoints: collections.OrderedDict[bytes, ucx_api.UCXEndpoint] = collections.OrderedDict()
        self._control_buffer = np.zeros(MAX_CONTROL_BYTES, dtype=np.uint8)
        self._control_rx = self._post_control_receive()
        self._control_tx: list[tuple[Message, float, bytes]] = []  # and its deadline and peer
        # The frames of control sends given up at their deadline. UCX keeps the pointer of a send to
        # a peer that takes nothing (frozen) and sends it once the peer resumes: freed, the frame
        # went out as whatever reused the memory. Kept for a good many later expiries instead; the
        # request objects are not kept (holding them past the worker's end hung the exit).
        self._expired_frames: collections.deque[np.ndarray] = collections.deque(maxlen=EXPIRED_FRAMES_KEPT)
        self._abandoned: list[tuple[Message, StagingArena | None]] = []

    @property
    def sending_control(self) -> bool:
        return bool(self._control_tx)

    @property
    def endpoint_count(self) -> int:
        return len(self._endpoints)

    def check_address(self, address: bytes) -> None:
        """MalformedMessageError for an address that would make UCX abort (wire.check_worker_address)."""
        check_worker_address(address, self.address)

    def endpoint(self, address: bytes) -> ucx_api.UCXEndpoint:
        """A cached endpoint, with UCX error handling on: a dead peer is then an error, not an abort.

        MalformedMessageError for an address UCX could abort on; a UCXError if UCX rejects it.
        """
        endpoint = self._endpoints.pop(address, None)
        if endpoint is None or not endpoint.alive:
            self.check_address(address)
            self._evict_idle()
            endpoint = self._worker.create_endpoint_from_worker_address(
                ucx_api.UCXAddress.create_from_buffer(address), True)
        self._endpoints[address] = endpoint  # last: the most recently used
        return endpoint

    def _evict_idle(self) -> None:
        """Make room for one endpoint by closing the least recently used that nothing uses."""
        if len(self._endpoints) < self._max_endpoints:
            return
        busy = self._in_use() | {address for _, _, address in self._control_tx}
        for address in [a for a in self._endpoints if a not in busy]:
            if len(self._endpoints) < self._max_endpoints:
                break
            self.drop_endpoint(address)

    def drop_endpoint(self, address: bytes) -> None:
        """Close an endpoint, which cancels its receives not yet matched."""
        endpoint = self._endpoints.pop(address, None)
        if endpoint is not None and endpoint.alive:  # closing a failed endpoint crashes ucxx 0.50
            endpoint.close()

    def send_control(self, address: bytes, frame: bytes, tag: int, deadline: float) -> bool:
        """Send a control message, sealed for `address`; False if the peer cannot be reached."""
        buffer = np.frombuffer(bytearray(seal(frame, self._key, address)), dtype=np.uint8)
        try:
            request = self.endpoint(address).tag_send(Array(buffer), ucx_api.UCXXTag(tag))
        except (ucx_api.UCXError, MalformedMessageError) as e:
            log.warning("cannot send to %s: %s", address[:8].hex(), e)
            return False
        self._control_tx.append((Message(request, buffer, len(buffer)), deadline, address))
        return True

    def open_control(self, data: bytes | memoryview) -> memoryview:
        """The frame of a control message sent to this agent (UnauthenticatedMessageError if forged)."""
        return unseal(data, self._key, self.address)

    def receive_control(self, handle: Callable[[ControlMessage], None]) -> bool:
        """Hand the control messages that arrived to `handle`; unauthenticated and malformed ones are
        counted and dropped, before anything in them is used."""
        worked = False
        for _ in range(_MAX_CONTROL_PER_STEP):
            if not self._control_rx.request.completed:
                break
            try:
                self._control_rx.request.check_error()
                message = decode_control(self.open_control(self._control_rx.buffer))
            except UnauthenticatedMessageError as e:
                self._metrics.add("unauthenticated_messages")
                log.warning("dropped a control message: %s", e)
            except (ucx_api.UCXError, MalformedMessageError) as e:
                self._metrics.add("malformed_messages")
                log.warning("dropped a malformed control message: %s", e)
            else:
                handle(message)
            self._control_rx = self._post_control_receive()
            worked = True
        return worked

    def _post_control_receive(self) -> Message:
        # Posted ahead rather than probed for: a probe takes the UCX worker lock, which the progress
        # thread may hold for a whole large message. A longer message fails as truncated.
        self._control_buffer.fill(0)
        request = self._worker.tag_recv(Array(self._control_buffer), ucx_api.UCXXTag(CONTROL_TAG))
        return Message(request, self._control_buffer, MAX_CONTROL_BYTES)

    def abandon(self, message: Message, arena: StagingArena | None = None) -> None:
        """Keep a message UCX may still use until it completes; its staging in `arena` is reused only then."""
        self._abandoned.append((message, arena))

    def reap(self, now: float) -> bool:
        """Retire finished control sends and abandoned messages (returning their staging)."""
        worked = False
        for item in list(self._control_tx):
            message, deadline, _ = item
            if message.request.completed or now >= deadline:
                if not message.request.completed:
                    self._expired_frames.append(message.buffer)
                self._control_tx.remove(item)
                worked = True
        for item in list(self._abandoned):
            message, arena = item
            if message.request.completed:
                self._abandoned.remove(item)
                if message.staged_at is not None:
                    self._staging.free(arena, message.staged_at, message.nbytes)
        return worked

    def close(self) -> None:
        for address in list(self._endpoints):
            self.drop_endpoint(address)
        self._worker.stop_progress_thread()
