"""Reaching context and generation instances on other tritonservers, over gRPC streaming.

One asyncio gRPC client per server, made on the orchestrator's event loop at first use and
reused by every request. Each worker request is a stream of its own carrying one request, opened
with the `triton_grpc_error` header: an error then ends the stream with its gRPC status, so a
worker's INVALID_ARG reaches the orchestrator as INVALID_ARGUMENT (the client's error) instead of
a bare message. Errors are sorted for the orchestrator's retry logic: the client's fault, a server
that could not be reached (it also leaves rotation), or any other failure.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import np_to_triton_dtype

from python_backend_utils.grpc_streams import end_stream

logger = logging.getLogger(__name__)

STREAM_HEADERS = {"triton_grpc_error": "true"}
# gRPC statuses that say the server itself could not be reached (down, restarting, refused).
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE,)
# HTTP/2 pings on every connection to a remote worker: a server that vanished without closing
# the connection (a host lost, a cable pulled) breaks its streams within about 40 s as
# UNAVAILABLE instead of leaving them waiting for the phase timeouts (minutes). Pings go on
# while a stream is quiet (a request queued on a busy worker), so the servers must accept
# them that often: the launcher starts tritonserver with MIN_PING_INTERVAL_MS (its default, 5
# minutes, would answer these pings with GOAWAY "too_many_pings").
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
MIN_PING_INTERVAL_MS = 20_000
KEEPALIVE = grpcclient.KeepAliveOptions(
    keepalive_time_ms=KEEPALIVE_TIME_MS,
    keepalive_timeout_ms=KEEPALIVE_TIMEOUT_MS,
    keepalive_permit_without_calls=False,  # health checks cover idle servers
    http2_max_pings_without_data=0,  # gRPC's default (2) stops pinging a stream that is quiet
)


class ClientError(Exception):
    """A worker refused the request's content: the client must hear it, retrying elsewhere won't help."""


class WorkerFailed(Exception):
    """A worker failed or did not answer in time."""


class WorkerUnreachable(WorkerFailed):
    """The worker's server could not be reached, or the connection to it broke: it leaves rotation."""


def classify(error: grpc.aio.AioRpcError, where: str) -> Exception:
    """The orchestrator's view of a failed stream."""
    code = error.code()
    details = error.details() or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ClientError(details)
    if code in UNREACHABLE:
        return WorkerUnreachable(f"{where} unreachable: {details}")
    return WorkerFailed(f"{where}: {code.name}: {details}")


def _grpc_input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    return tensor.set_data_from_numpy(array)


class RemoteStream:
    """The responses of one request on a remote worker, as dicts of arrays."""

    def __init__(self, call, where: str, on_end) -> None:
        self._call = call
        self._where = where
        self._on_end = on_end
        self._answered = False  # the final response (or an in-band error) came
        self._ended = False
        self._ending: asyncio.Task | None = None

    async def next(self, timeout: float) -> dict[str, np.ndarray] | None:
        """The next response's outputs, or None at the end; raises asyncio.TimeoutError, ClientError
        or WorkerFailed (WorkerUnreachable when the server could not be reached or went away).

        After the final response the server ends the call by itself; it is read to that end in
        the background (grpc_streams.py says why), and only then does the stream count as
        ended, which may close the client of a server that left the deployment."""
        while not self._answered:
            try:
                result, error = await asyncio.wait_for(self._call.__anext__(), timeout)
            except StopAsyncIteration:
                self._end()
                return None
            except grpc.aio.AioRpcError as rpc_error:
                self._end()
                raise classify(rpc_error, self._where) from None
            if error is not None:  # a server without triton_grpc_error support reports errors in-band
                self._answer()
                raise WorkerFailed(f"{self._where}: {error.message()}")
            response = result.get_response()
            outputs = {output.name: result.as_numpy(output.name) for output in response.outputs}
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                self._answer()
            if outputs:
                return outputs
        return None

    def cancel(self) -> None:
        """Stop the request on the worker, unless it has answered (then its call is ending)."""
        if not self._answered and not self._ended:
            self._call.cancel()
            self._end()

    def _answer(self) -> None:
        self._answered = True

        async def wait_for_the_end() -> None:
            try:
                await end_stream(self._call)
            finally:
                self._end()

        self._ending = asyncio.get_running_loop().create_task(wait_for_the_end())

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._on_end()


class RemoteWorkers:
    """gRPC clients of the servers in a deployment, one per server, and the streams open on them.

    Clients are made lazily on the running event loop (gRPC's asyncio objects belong to one loop).
    A server that leaves the deployment (`set_urls`) keeps its client until its last stream ends.
    """

    def __init__(self) -> None:
        self._clients: dict[str, grpcaio.InferenceServerClient] = {}
        self._open: dict[str, int] = {}
        self._retired: set[str] = set()
        self._streams: dict[str, RemoteStream] = {}  # by worker request id, for stop()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def open(self, url: str, model_name: str, version: int, request_id: str,
             inputs: dict[str, np.ndarray], outputs: list[str]) -> RemoteStream:
        """Start one request; nothing waits here (the first `next` sees a connect failure)."""
        stream = self._start(url, model_name, version, request_id, inputs, outputs, track=True)
        self._streams[request_id] = stream
        return stream

    async def stop(self, url: str, model_name: str, version: int, request_id: str, timeout: float) -> None:
        """Ask the worker to abort `request_id` (its KV is freed), then drop our stream of it.

        The stop request carries the same request id: that is how the worker finds the request."""
        stop = self._start(url, model_name, version, request_id,
                           {"input_ids": np.zeros(1, np.int32), "stop": np.array([True])}, [], track=False)
        try:
            while await stop.next(timeout) is not None:
                pass
        finally:
            stop.cancel()
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.cancel()

    def set_urls(self, urls: set[str]) -> None:
        """The servers now in the deployment (called from the membership thread). A server that left
        keeps its client until its last stream ends, so in-flight requests finish first."""
        with self._lock:
            self._retired = {url for url in self._clients if url not in urls}
            idle = [url for url in self._retired if not self._open.get(url)]
        if idle and self._loop is not None:
            for url in idle:
                self._loop.call_soon_threadsafe(self._close_if_idle, url)

    def _start(self, url: str, model_name: str, version: int, request_id: str,
               inputs: dict[str, np.ndarray], outputs: list[str], track: bool) -> RemoteStream:
        client = self._client(url)
        request = {
            "model_name": model_name,
            "model_version": str(version),
            "inputs": [_grpc_input(name, array) for name, array in inputs.items()],
            "outputs": [grpcclient.InferRequestedOutput(name) for name in outputs],
            "request_id": request_id,
            "parameters": {"triton_enable_empty_final_response": True},
        }

        async def one_request():
            yield request

        call = client.stream_infer(one_request(), headers=STREAM_HEADERS)
        with self._lock:
            self._open[url] = self._open.get(url, 0) + 1
        return RemoteStream(call, f"{model_name}/{version}@{url}",
                            lambda: self._stream_ended(url, request_id if track else None))

    def _client(self, url: str) -> grpcaio.InferenceServerClient:
        self._loop = asyncio.get_running_loop()
        with self._lock:
            client = self._clients.get(url)
            if client is None:
                client = self._clients[url] = grpcaio.InferenceServerClient(url, keepalive_options=KEEPALIVE)
            return client

    def _stream_ended(self, url: str, request_id: str | None) -> None:
        if request_id is not None:
            self._streams.pop(request_id, None)
        with self._lock:
            self._open[url] -= 1
        self._close_if_idle(url)

    def _close_if_idle(self, url: str) -> None:
        with self._lock:
            if url not in self._retired or self._open.get(url):
                return
            self._retired.discard(url)
            client = self._clients.pop(url, None)
            self._open.pop(url, None)
        if client is not None:
            logger.info("closing the gRPC client of %s: it left the deployment and its requests ended", url)
            asyncio.get_running_loop().create_task(client.close())
