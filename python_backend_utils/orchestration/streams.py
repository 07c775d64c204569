"""Worker streams: the responses of one worker request, read the same way whether the worker is a
model on this server (BLS, here) or on another server (`remote.RemoteStream`, gRPC).

Both have `async next(timeout)`: the next response's outputs, or None at the end; both raise
asyncio.TimeoutError, ClientError (the worker said INVALID_ARG) or WorkerFailed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import Protocol

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend_utils.errors import is_client_error_message
from python_backend_utils.orchestration.admission import held
from python_backend_utils.orchestration.remote import ClientError, WorkerFailed
from python_backend_utils.orchestration.routing import Worker
from python_backend_utils.triton_glue.stub_recovery import is_dead_stub_error

_END = object()


class WorkerStream(Protocol):
    async def next(self, timeout: float) -> dict[str, np.ndarray] | None: ...


class StubDied(WorkerFailed):
    """The instance on this server lost its stub process, or Triton gave up on a frozen one: it
    fails every request until reloaded."""


async def wait_plainly(future: asyncio.Future, timeout: float):
    return await asyncio.wait_for(asyncio.shield(future), timeout)


class LocalStream:
    """Async access to the blocking response iterator of a BLS request to a model on this server.

    `wait(future, timeout)` waits for each response: the orchestrator's checks the instance's
    stub while it waits. `stub_lost()` is called before StubDied is raised."""

    def __init__(self, iterator, executor: concurrent.futures.Executor, where: Worker,
                 wait: Callable[[asyncio.Future, float], Awaitable] = wait_plainly,
                 stub_lived: Callable[[], bool] = lambda: True, stub_lost: Callable[[], None] = lambda: None) -> None:
        self._iterator = iterator
        self._executor = executor
        self._where = where
        self._wait = wait
        self._stub_lived = stub_lived
        self._stub_lost = stub_lost
        self._pending: asyncio.Future | None = None

    async def next(self, timeout: float) -> dict[str, np.ndarray] | None:
        """The next response's outputs, or None at the end; raises asyncio.TimeoutError,
        ClientError (the worker said INVALID_ARG) or WorkerFailed."""
        while True:
            if self._pending is None:  # a wait that timed out leaves its read running: the next call takes it up
                self._pending = held(asyncio.get_running_loop().run_in_executor(self._executor, next, self._iterator,
                                                                                _END))
            response = await self._wait(self._pending, timeout)
            self._pending = None
            if response is _END:
                if not self._stub_lived():  # Triton may end the stream of a killed stub without an error
                    self._stub_lost()
                    raise StubDied(f"{self._where}: its stub process died before the request finished")
                return None
            if response.has_error():
                error = response.error()
                if error.code() == pb_utils.TritonError.INVALID_ARG or is_client_error_message(error.message()):
                    raise ClientError(error.message())
                if is_dead_stub_error(error.message()):
                    self._stub_lost()
                    raise StubDied(f"{self._where}: {error.message()}")
                raise WorkerFailed(f"{self._where}: {error.message()}")
            outputs = {t.name(): t.as_numpy() for t in response.output_tensors()}
            if outputs:
                return outputs
