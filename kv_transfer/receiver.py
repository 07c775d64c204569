"""The receiver side: running pulls (planned in pull.py), one sub-pull per sender.

For each sender the receiver sends a `PullRequest` on `CONTROL_TAG` to the sender's worker
address: request id, secret, the layer/head slice it wants, and how it will take the data; the
sender answers on the pull's response tag (see sender.py). On one host the receiver reads the
sender's pool itself (shared_read.py). Otherwise (across hosts, or a pool on a GPU) it posts
receives for message k on ``data_tag(pull_id, k)`` ahead, into its pool or into staging and then
converts.
"""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import torch
import ucxx._lib.libucxx as ucx_api
from ucxx._lib.arr import Array

from .config import TransferConfig
from .conversion import scatter
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
    UnauthenticatedMessageError,
)
from .handle import KVHandle
from .metrics import TransferMetrics
from .pool import LocalPool
from .pull import Phase, Pull, PullResult, SubPull, message_limit, plan_pull
from .shared_read import SharedReader
from .staging import Staging
from .transport import MESSAGES_IN_FLIGHT, Message, Transport
from .wire import (
    CONTROL_TAG,
    MAX_RESPONSE_BYTES,
    PullAbandoned,
    PullDone,
    PullRequest,
    PullResponse,
    PullStatus,
    data_tag,
    response_tag,
)

# Pulls that fail these ways leave the sender nothing to free early: refused or expired there,
# refused here before asking (another receiver may still pull it), or this agent is closing.
_NOTHING_TO_ABANDON = (AgentClosedError, PullRefusedError, PeerNotAllowedError, HandleExpiredError,
                       LayoutMismatchError)


class Receiver:
    """Runs this agent's pulls.

    `plan` runs on callers' threads; everything else on the agent's service thread, which wakes
    on `wake`.
    """

    def __init__(self, pool: LocalPool, config: TransferConfig, metrics: TransferMetrics, transport: Transport,
                 staging: Staging, reader: SharedReader, wake: threading.Event) -> None:
        self._pool = pool
        self._config = config
        self._metrics = metrics
        self._transport = transport
        self._staging = staging
        self._reader = reader
        self._wake = wake
        self.pulls: list[Pull] = []
        self._pull_ids = itertools.count(1)

    def plan(self, handles: list[KVHandle], dest: tuple[int, ...]) -> Pull:
        """Plan a pull, on the caller's thread: LayoutMismatchError if the handles or destination cannot fit."""
        pull = plan_pull(self._pool, handles, dest, self._reader.can_read)
        self._metrics.add("pulls_started")
        self._metrics.add("pulls_in_flight")
        return pull

    @property
    def idle(self) -> bool:
        return not self.pulls

    def peers(self) -> set[bytes]:
        """The senders that pulls under way receive from."""
        return {sub.handle.agent_address for pull in self.pulls for sub in pull.subs}

    def start(self, pull: Pull) -> None:
        self.pulls.append(pull)
        for i, sub in enumerate(pull.subs):
            if self._config.parallel_receive or i == 0:
                self._start_sub(sub, pull)

    def _start_sub(self, sub: SubPull, pull: Pull) -> None:
        handle = sub.handle
        sub.pull_id = next(self._pull_ids)
        if not self._config.allows(handle.agent_name):
            self._fail_sub(sub, PeerNotAllowedError(f"agent {handle.agent_name!r} is not an allowed peer"))
            return
        if handle.expired():
            self._fail_sub(sub, HandleExpiredError(f"handle for {handle.request_id!r} expired"))
            return
        if handle.agent_process.is_alive() is False:
            self._fail_sub(sub, PeerUnreachableError(f"sender {handle.agent_name} is gone"))
            return
        try:
            sub.endpoint = self._transport.endpoint(handle.agent_address)
            if self._reader.can_read(handle):
                sub.shared_pool = self._reader.map_pool(handle)
            if sub.shared_pool is None:
                sub.in_place = self._config.zero_copy and self._pool.on_host and sub.route.lands_in_place()
                sub.boundaries = sub.route.plan(handle.block_ids, pull.dest_block_ids,
                                                message_limit(self._pool, handle), sub.in_place)
        except ucx_api.UCXError as e:
            self._fail_sub(sub, PeerUnreachableError(f"cannot connect to {handle.agent_name}: {e}"))
            return
        except (LayoutMismatchError, MalformedMessageError) as e:  # malformed: the handle's address
            self._fail_sub(sub, e)
            return
        request = PullRequest(sub.pull_id, self._transport.address, self._config.name, self._pool.process,
                              handle.request_id, handle.secret, sub.route.src_layers, sub.route.src_heads,
                              shared=sub.shared_pool is not None,
                              boundaries=() if sub.shared_pool is not None else tuple(sub.boundaries))
        sub.phase = Phase.REQUESTED
        sub.deadline = time.monotonic() + self._config.response_timeout_s
        if not self._post_response_receive(sub):
            return
        if not self._transport.send_control(handle.agent_address, request.to_bytes(), CONTROL_TAG, sub.deadline):
            self._fail_sub(sub, PeerUnreachableError(f"cannot reach {handle.agent_name}"))
        elif sub.shared_pool is not None:  # read while the sender checks the request (see shared_read.py)
            sub.copy = self._reader.read(sub.route, sub.shared_pool, handle.block_ids, self._pool.tensor,
                                         pull.dest_block_ids, pull.num_tokens,
                                         lambda _: self._wake.set())  # release the sender's blocks at once

    def _post_response_receive(self, sub: SubPull) -> bool:
        buffer = np.zeros(MAX_RESPONSE_BYTES, dtype=np.uint8)
        try:
            response = sub.endpoint.tag_recv(Array(buffer), ucx_api.UCXXTag(response_tag(sub.pull_id)))
        except ucx_api.UCXError as e:
            self._fail_sub(sub, PeerUnreachableError(f"cannot reach {sub.handle.agent_name}: {e}"))
            return False
        sub.response = Message(response, buffer, MAX_RESPONSE_BYTES)
        return True

    def advance(self, now: float) -> bool:
        worked = False
        for pull in list(self.pulls):
            worked |= self._advance_pull(pull, now)
        return worked

    def _advance_pull(self, pull: Pull, now: float) -> bool:
        worked = False
        if now >= pull.deadline:
            for sub in pull.subs:
                self._fail_sub(sub, TransferTimeoutError(f"the pull of {sub.handle.request_id!r} from "
                                                         f"{sub.handle.agent_name} is overdue"))
        for i, sub in enumerate(pull.subs):
            if sub.phase is Phase.WAITING and all(s.phase is Phase.DONE for s in pull.subs[:i]):
                self._start_sub(sub, pull)
            if sub.phase is Phase.REQUESTED:
                worked |= self._await_response(sub, now)
            if sub.shared_pool is not None:
                if sub.phase is Phase.RECEIVING:
                    worked |= self._read_shared(sub, now)
                elif sub.phase is Phase.DRAINING and sub.copy.done():
                    sub.phase = Phase.FAILED
            elif sub.phase in (Phase.RECEIVING, Phase.DRAINING):
                worked |= self._receive(sub, pull, now)
        if any(s.phase is Phase.FAILED for s in pull.subs):
            for sub in pull.subs:
                if sub.phase is Phase.WAITING:  # sequential receive: the rest never starts
                    sub.phase = Phase.FAILED
        if all(s.phase in (Phase.DONE, Phase.FAILED) for s in pull.subs):
            self._finish_pull(pull)
            return True
        return worked

    def _await_response(self, sub: SubPull, now: float) -> bool:
        if sub.response.request.completed:
            try:
                sub.response.request.check_error()
                response = PullResponse.from_bytes(self._transport.open_control(sub.response.buffer))
                if response.pull_id != sub.pull_id:
                    raise MalformedMessageError(f"response for pull {response.pull_id}, expected {sub.pull_id}")
            except UnauthenticatedMessageError:  # forged: drop it, the real answer may still come
                self._metrics.add("unauthenticated_messages")
                self._post_response_receive(sub)
                return True
            except ucx_api.UCXError as e:
                self._fail_sub(sub, self._receive_error(sub, e, before_data=True))
                return True
            except MalformedMessageError as e:
                self._metrics.add("malformed_messages")
                self._fail_sub(sub, MalformedMessageError(f"bad response from {sub.handle.agent_name}: {e}"))
                return True
            if response.status is PullStatus.REFUSED:
                self._fail_sub(sub, PullRefusedError(f"{sub.handle.agent_name} refused the pull of "
                                                     f"{sub.handle.request_id!r}"))
            else:
                sub.phase = Phase.RECEIVING
                sub.accepted_at = sub.progress_at = now
            return True
        if now >= sub.deadline:
            self._fail_sub(sub, PeerUnreachableError(
                f"{sub.handle.agent_name} did not answer within {self._config.response_timeout_s:g} s"))
            return True
        return False

    def _read_shared(self, sub: SubPull, now: float) -> bool:
        """Once the copier has read the mapped sender pool, tell the sender it may release the blocks."""
        if not sub.copy.done():
            return False
        if sub.copy.exception() is not None:
            self._fail_sub(sub, KVTransferError(f"reading the pool of {sub.handle.agent_name} failed: "
                                                f"{sub.copy.exception()!r}"))
        elif now - sub.accepted_at > self._config.transfer_timeout_s:  # the sender may have stopped waiting
            self._fail_sub(sub, TransferTimeoutError(
                f"reading from {sub.handle.agent_name} took over {self._config.transfer_timeout_s:g} s"))
        else:
            nbytes = len(sub.handle.block_ids) * sub.route.block_bytes
            sub.bytes_received = nbytes
            self._metrics.add("bytes_received", nbytes)
            self._metrics.add("bytes_read_shared", nbytes)
            # if the sender is gone there is nobody left to release the blocks: the data is still good
            done = PullDone(sub.pull_id, self._transport.address, sub.handle.secret).to_bytes()
            self._transport.send_control(sub.handle.agent_address, done, CONTROL_TAG,
                                         now + self._config.response_timeout_s)
            sub.phase = Phase.DONE
        return True

    def _receive(self, sub: SubPull, pull: Pull, now: float) -> bool:
        worked = False
        route, recv_arena = sub.route, self._staging.recv
        for message in [m for m in sub.in_flight if m.request.completed]:
            sub.in_flight.remove(message)
            try:
                message.request.check_error()
                failed = None
            except ucx_api.UCXError as e:
                failed = e
            if failed is None and sub.phase is Phase.RECEIVING and message.staged_at is not None:
                count = message.nbytes // route.block_bytes
                selection = recv_arena.tensor(message.staged_at, message.nbytes) \
                    .view(route.sender.torch_dtype).view(count, *route.block_shape)
                scatter(route, selection, message.first_block, self._pool.tensor, pull.dest_block_ids,
                        pull.num_tokens)
            if message.staged_at is not None:
                self._staging.free(recv_arena, message.staged_at, message.nbytes)
            if failed is not None:
                self._fail_sub(sub, self._receive_error(sub, failed, before_data=False))
            else:
                sub.bytes_received += message.nbytes
                self._metrics.add("bytes_received", message.nbytes)
            sub.progress_at = now
            worked = True
        if sub.phase is Phase.DRAINING:
            if not sub.in_flight:
                sub.phase = Phase.FAILED
            elif now - sub.progress_at > self._config.transfer_timeout_s:
                # a receive UCX never completes (not seen here): give up on it
                for message in sub.in_flight:
                    self._transport.abandon(message, recv_arena)
                sub.in_flight.clear()
                sub.phase = Phase.FAILED
            return worked
        worked |= self._post_receives(sub, pull)
        if sub.next_message == len(sub.boundaries) - 1 and not sub.in_flight:
            sub.phase = Phase.DONE
            return True
        if now - sub.progress_at > self._config.transfer_timeout_s:
            self._fail_sub(sub, TransferTimeoutError(
                f"no data from {sub.handle.agent_name} for {self._config.transfer_timeout_s:g} s"))
            return True
        return worked

    def _post_receives(self, sub: SubPull, pull: Pull) -> bool:
        """Post receives for the next messages, within the in-flight and staging limits.

        Posted ahead, not probed for: UCX matches each message as it arrives and the progress
        thread chains the copies (probing measured 15-20% slower with many messages). The cost: a
        message shorter than planned is not detected (the Python API reports no received length);
        a longer one fails as truncated.
        """
        worked = False
        route, recv_arena = sub.route, self._staging.recv
        while sub.next_message < len(sub.boundaries) - 1 and len(sub.in_flight) < MESSAGES_IN_FLIGHT:
            k = sub.next_message
            first, last = sub.boundaries[k], sub.boundaries[k + 1]
            nbytes = (last - first) * route.block_bytes
            staged_at = None
            if sub.in_place:
                start = pull.dest_block_ids[first] * self._pool.layout.bytes_per_block
                target = self._pool.host_bytes[start:start + nbytes]
            else:
                staged_at = self._staging.alloc(recv_arena, nbytes)
                if staged_at is None:
                    break
                target = recv_arena.array(staged_at, nbytes)
                self._metrics.add("bytes_staged_received", nbytes)
            try:
                recv = sub.endpoint.tag_recv(Array(target), ucx_api.UCXXTag(data_tag(sub.pull_id, k)))
            except ucx_api.UCXError as e:
                if staged_at is not None:
                    self._staging.free(recv_arena, staged_at, nbytes)
                self._fail_sub(sub, PeerLostError(f"receiving from {sub.handle.agent_name} failed: {e}"))
                return True
            sub.in_flight.append(Message(recv, target, nbytes, first_block=first, staged_at=staged_at))
            sub.next_message += 1
            worked = True
        return worked

    def _receive_error(self, sub: SubPull, error: ucx_api.UCXError, *, before_data: bool) -> KVTransferError:
        name = sub.handle.agent_name
        if isinstance(error, ucx_api.UCXMessageTruncatedError):
            self._metrics.add("malformed_messages")
            return MalformedMessageError(f"a message from {name} was longer than planned")
        if before_data:  # no acceptance came: nothing says the blocks were ever pinned for us
            return PeerUnreachableError(f"no answer from {name}: {error}")
        if isinstance(error, ucx_api.UCXCanceledError):
            return PeerLostError(f"the connection to {name} was reset after a transfer from it failed")
        return PeerLostError(f"receiving from {name} failed: {error}")

    def _fail_sub(self, sub: SubPull, error: KVTransferError) -> None:
        """Fail one sender's part of a pull; the pull ends once nothing can write its destination.

        Receives already posted would write into the destination whenever the data came: closing
        the endpoint cancels those not yet matched (a concurrent pull from the same sender fails
        with them: the peer is broken or too slow); receives and a shared-memory copy under way
        are waited for.
        """
        if sub.phase in (Phase.DONE, Phase.FAILED, Phase.DRAINING):
            return
        sub.error = error
        awaiting_response = sub.response is not None and not sub.response.request.completed
        if sub.in_flight or awaiting_response:
            self._transport.drop_endpoint(sub.handle.agent_address)
        if awaiting_response:  # its buffer is private: cancelled or not, it cannot hurt the pool
            self._transport.abandon(sub.response)
        copying = sub.copy is not None and not sub.copy.done()
        sub.phase = Phase.DRAINING if sub.in_flight or copying else Phase.FAILED
        sub.progress_at = time.monotonic()

    def _finish_pull(self, pull: Pull) -> None:
        if pull in self.pulls:
            self.pulls.remove(pull)
        self._metrics.add("pulls_in_flight", -1)
        errors = [s.error for s in pull.subs if s.error is not None]
        if errors or not all(s.phase is Phase.DONE for s in pull.subs):
            if any(s.copy is not None for s in pull.subs):  # a read ahead of a refusal leaves nothing behind
                self._pool.tensor[torch.tensor(pull.dest_block_ids)] = 0
            self._metrics.add("pulls_failed")
            error = errors[0] if errors else AgentClosedError("pull abandoned")
            if not isinstance(error, _NOTHING_TO_ABANDON):
                self._abandon(pull)
            pull.future.set_exception(error)
            return
        duration = time.perf_counter() - pull.started
        self._metrics.add("pulls_completed")
        self._metrics.observe("pull_duration_s", duration)
        received = sum(s.bytes_received for s in pull.subs)
        pull.future.set_result(PullResult(pull.future.request_id, pull.num_tokens, received, duration))

    def _abandon(self, pull: Pull) -> None:
        """Tell each sender whose part did not arrive that nobody will pull it (the request is
        prefilled here instead), so it frees the blocks now, not at the handle's expiry. A frozen
        sender gets it on resuming: UCX still sends it after its deadline, and the transport keeps
        the frame of a send it gave up on."""
        deadline = time.monotonic() + self._config.response_timeout_s
        for sub in pull.subs:
            if sub.phase is not Phase.DONE and sub.handle.agent_process.is_alive() is not False:
                abandoned = PullAbandoned(self._config.name, sub.handle.request_id, sub.handle.secret).to_bytes()
                self._transport.send_control(sub.handle.agent_address, abandoned, CONTROL_TAG, deadline)

    def check_liveness(self) -> None:
        for pull in self.pulls:
            for sub in pull.subs:
                if sub.handle.agent_process.is_alive() is not False:
                    continue
                if sub.shared_pool is not None and sub.phase is Phase.RECEIVING:
                    continue  # accepted: the mapped pool outlives its process, the read finishes regardless
                if sub.phase is Phase.REQUESTED:
                    self._fail_sub(sub, PeerUnreachableError(f"sender {sub.handle.agent_name} is gone"))
                elif sub.phase is Phase.RECEIVING:
                    self._fail_sub(sub, PeerLostError(f"sender {sub.handle.agent_name} died mid-transfer"))
        self._reader.forget_dead()

    def close(self) -> None:
        """Wait for the reads under way, then fail every pull still in flight."""
        self._reader.close()
        for pull in list(self.pulls):
            for sub in pull.subs:
                if sub.phase not in (Phase.DONE, Phase.FAILED):
                    sub.error = sub.error or AgentClosedError("agent closed during the pull")
                    sub.phase = Phase.FAILED
            self._finish_pull(pull)
