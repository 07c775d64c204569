"""Test helpers for kv_transfer: agents in a second process, and a misbehaving raw-ucxx peer.

A `Peer` is a spawned child process (its own process group) hosting any number of
TransferAgents, driven over a pipe; every call has a timeout, so a broken child fails a test
instead of hanging it. A `RogueSender` speaks the wire protocol with raw ucxx and breaks it
on purpose (no answer, a corrupt answer, an oversized message, a stall), and delivers control
messages forged by a test.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import traceback

import torch

import kv_transfer
from kv_transfer import KVHandle, KVLayout, TransferAgent, TransferConfig, allocate_kv_pool

CALL_TIMEOUT_S = 60.0


def fill_pool(pool: torch.Tensor, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pool.copy_(torch.randn(pool.shape, generator=g, dtype=torch.float32).to(pool.dtype))


def token_view(pool: torch.Tensor, layout: KVLayout, block_ids, num_tokens: int) -> torch.Tensor:
    """The request's KV as [layers, 2, tokens, heads, dim] (local layers and heads), plain torch."""
    blocks = pool[list(block_ids)]  # [n, L, 2, bs, H, D]
    flat = blocks.permute(1, 2, 0, 3, 4, 5).reshape(layout.num_layers, 2, -1, layout.num_kv_heads, layout.head_dim)
    return flat[:, :, :num_tokens]


def expected_for(receiver: KVLayout, senders: list[tuple[KVLayout, torch.Tensor]]) -> torch.Tensor:
    """The reference: what the receiver's tokens must hold, assembled from each sender's tokens."""
    ref = None
    for layout, tokens in senders:
        if ref is None:
            ref = torch.full((receiver.num_layers, 2, tokens.shape[2], receiver.num_kv_heads, receiver.head_dim),
                             float("nan"), dtype=receiver.torch_dtype)
        l0, l1 = max(layout.layer_start, receiver.layer_start), min(layout.layer_end, receiver.layer_end)
        h0, h1 = max(layout.head_start, receiver.head_start), min(layout.head_end, receiver.head_end)
        if l0 >= l1 or h0 >= h1:
            continue
        ref[l0 - receiver.layer_start:l1 - receiver.layer_start, :, :, h0 - receiver.head_start:h1 - receiver.head_start] = \
            tokens[l0 - layout.layer_start:l1 - layout.layer_start, :, :,
                   h0 - layout.head_start:h1 - layout.head_start].to(receiver.torch_dtype)
    return ref


# ---------------------------------------------------------------- child side


class _Host:
    def __init__(self) -> None:
        self.agents: dict[str, TransferAgent] = {}
        self.layouts: dict[str, KVLayout] = {}
        self.releases: dict[str, list] = {}
        self.pulls: dict[int, kv_transfer.PullFuture] = {}
        self.lock = threading.Lock()

    def create_agent(self, key, layout: dict, num_blocks, seed, config: dict):
        layout = KVLayout.from_dict(layout)
        pool = allocate_kv_pool(layout, num_blocks)
        if seed is not None:
            fill_pool(pool, seed)
        self.agents[key] = TransferAgent(pool, layout, TransferConfig(**config))
        self.layouts[key] = layout
        self.releases[key] = []

    def publish(self, key, request_id, block_ids, num_tokens):
        def on_release(rid, reason):
            with self.lock:
                self.releases[key].append((rid, reason.value))
        return self.agents[key].publish(request_id, block_ids, num_tokens, on_release).to_bytes()

    def revoke(self, key, request_id):
        self.agents[key].revoke(request_id)

    def releases_of(self, key):
        with self.lock:
            return list(self.releases[key])

    def metrics(self, key):
        return self.agents[key].metrics.snapshot()

    def endpoints(self, key):
        return self.agents[key]._transport.endpoint_count

    def pull_start(self, key, handles, dest):
        future = self.agents[key].pull([KVHandle.from_bytes(h) for h in handles], dest)
        self.pulls[id(future)] = future
        return id(future)

    def pull_wait(self, token, timeout):
        return self.pulls.pop(token).result(timeout)

    def hold_reads(self, key):
        """Queue a task that never ends on the agent's copier: every shared-memory read it starts
        from now on stays under way, so a test strikes mid-read without racing the copy."""
        self.agents[key]._receiver._reader._copier.submit(threading.Event().wait)

    def blocks(self, key, block_ids):
        return self.agents[key]._pool[list(block_ids)].clone()

    def close_agent(self, key):
        self.agents.pop(key).close()


def _child_main(conn) -> None:
    os.setpgrp()  # the test owns this group and kills it whole
    host = _Host()
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
            break
        if method == "exit":
            break
        try:
            conn.send(("ok", getattr(host, method)(*args)))
        except Exception as e:  # noqa: BLE001 - report to the test, keep serving
            conn.send(("error", type(e).__name__, str(e), traceback.format_exc()))
    for agent in host.agents.values():
        agent.close()
    conn.close()


# ---------------------------------------------------------------- test side


class Peer:
    """A child process hosting agents. Use as a context manager: it is killed on exit."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_child_main, args=(child_conn,), daemon=True)
        self.process.start()
        child_conn.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def call(self, method: str, *args, timeout: float = CALL_TIMEOUT_S):
        try:
            self._conn.send((method, args))
            if not self._conn.poll(timeout):
                raise TimeoutError(f"peer did not answer {method} within {timeout} s")
            reply = self._conn.recv()
        except (EOFError, OSError) as e:
            raise RuntimeError(f"peer process died (exit code {self.process.exitcode})") from e
        if reply[0] == "ok":
            return reply[1]
        _, name, message, tb = reply
        error_type = getattr(kv_transfer, name, None)
        if isinstance(error_type, type) and issubclass(error_type, Exception):
            raise error_type(message)
        raise RuntimeError(f"peer raised {name}: {message}\n{tb}")

    def kill(self) -> None:
        _kill_group(self.process)

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self._conn.send(("exit", ()))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(10)
        self.kill()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill_group(process) -> None:
    if process.is_alive():
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # killed before it made its own group
            process.kill()
    process.join(10)


# ---------------------------------------------------------------- a peer that breaks the protocol

GARBAGE_MESSAGES = 4  # what RogueSender.send_garbage_to sends: junk, truncated, corrupted, oversized


def _rogue_main(conn) -> None:
    os.setpgrp()
    import numpy as np
    import ucxx._lib.libucxx as ucx_api
    from ucxx._lib.arr import Array

    from kv_transfer.liveness import ProcessIdentity
    from kv_transfer.wire import (
        CONTROL_TAG,
        MAX_CONTROL_BYTES,
        PullRequest,
        PullResponse,
        PullStatus,
        data_tag,
        decode_control,
        response_tag,
    )

    context = ucx_api.UCXContext(config_dict={"NET_DEVICES": "lo"},
                                 feature_flags=(ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP))
    worker = ucx_api.UCXWorker(context)
    worker.start_progress_thread(polling_mode=False, epoll_timeout=1)
    conn.send((worker.address.tobytes(), ProcessIdentity.current()))
    keep = []  # buffers and endpoints UCX may still use
    mode = "silent"

    def endpoint_to(address: bytes):
        endpoint = worker.create_endpoint_from_worker_address(ucx_api.UCXAddress.create_from_buffer(address), True)
        keep.append(endpoint)
        return endpoint

    def send(endpoint, payload: bytes, tag: int):
        buffer = np.frombuffer(bytearray(payload), dtype=np.uint8)
        request = endpoint.tag_send(Array(buffer), ucx_api.UCXXTag(tag))
        keep.append((buffer, request))
        return request

    buffer = np.zeros(MAX_CONTROL_BYTES, dtype=np.uint8)
    incoming = worker.tag_recv(Array(buffer), ucx_api.UCXXTag(CONTROL_TAG))
    while True:
        if conn.poll(0.002):
            command, argument = conn.recv()
            if command == "mode":
                mode = argument
            elif command == "raw":  # control messages made by the test: (address, payloads)
                endpoint = endpoint_to(argument[0])
                requests = [send(endpoint, payload, CONTROL_TAG) for payload in argument[1]]
                while not all(r.completed for r in requests):
                    time.sleep(0.001)
            else:  # "garbage": junk control messages to the agent at `argument`
                endpoint = endpoint_to(argument)
                good = PullRequest(1, worker.address.tobytes(), "rogue", ProcessIdentity.current(), "r",
                                   bytes(16), (0, 1), (0, 1), False, (0, 1)).to_bytes()
                flipped = good[:20] + bytes([good[20] ^ 0xFF]) + good[21:]
                oversized = good + bytes(MAX_CONTROL_BYTES)  # longer than the receive posted for it
                garbage = (b"not a kv_transfer message", good[:len(good) // 2], flipped, oversized)
                assert len(garbage) == GARBAGE_MESSAGES
                requests = [send(endpoint, payload, CONTROL_TAG) for payload in garbage]
                while not all(r.completed for r in requests):
                    time.sleep(0.001)
            conn.send("ok")
        if not incoming.completed:
            continue
        pull = decode_control(buffer)
        incoming = worker.tag_recv(Array(buffer), ucx_api.UCXXTag(CONTROL_TAG))
        if mode == "silent" or not isinstance(pull, PullRequest):  # a PullAbandoned after a failed pull
            continue
        endpoint = endpoint_to(pull.reply_address)
        accepted = PullResponse(pull.pull_id, PullStatus.ACCEPTED).to_bytes()
        if mode == "corrupt_response":
            send(endpoint, accepted[:-1] + bytes([accepted[-1] ^ 0xFF]), response_tag(pull.pull_id))
            continue
        send(endpoint, accepted, response_tag(pull.pull_id))
        if mode == "long_message":
            send(endpoint, bytes(1 << 20), data_tag(pull.pull_id, 0))
        # "stall": accepted, and then nothing


class RogueSender:
    """A raw ucxx worker in a child process that answers pull requests wrongly, per its mode:
    silent, corrupt_response, long_message or stall. It can also send junk control messages."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_rogue_main, args=(child_conn,), daemon=True)
        self.process.start()
        child_conn.close()
        if not self._conn.poll(CALL_TIMEOUT_S):
            raise TimeoutError("rogue peer did not start")
        self.address, self.identity = self._conn.recv()

    def _call(self, command: str, argument) -> None:
        self._conn.send((command, argument))
        if not self._conn.poll(CALL_TIMEOUT_S):
            raise TimeoutError(f"rogue peer did not do {command}")
        self._conn.recv()

    def set_mode(self, mode: str) -> None:
        self._call("mode", mode)

    def send_garbage_to(self, address: bytes) -> None:
        self._call("garbage", address)

    def send_control_to(self, address: bytes, payloads: list[bytes]) -> None:
        """Deliver `payloads`, as they are, on the control tag of the agent at `address`."""
        self._call("raw", (address, payloads))

    def handle_like(self, handle: KVHandle) -> KVHandle:
        """A handle that points at this rogue peer instead of the real sender."""
        import dataclasses
        return dataclasses.replace(handle, agent_address=self.address, agent_process=self.identity,
                                   agent_name="rogue", shared_pool=None)

    def close(self) -> None:
        _kill_group(self.process)

    def __enter__(self) -> RogueSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
