"""Noticing a client's cancellation while the orchestrator waits for a worker.

Triton tells a model about a cancelled request only when asked (`request.is_cancelled()`), so a
wait for a worker that is quiet (a request queued behind a busy generation instance, a long
prefill) checks it every CANCEL_POLL_S instead of only between responses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol, TypeVar

from python_backend_utils.errors import RequestAbortedError

# A request waiting in a busy worker's queue is stopped there within this time of its client leaving.
CANCEL_POLL_S = 0.5

T = TypeVar("T")


class ClientCancelled(RequestAbortedError):
    """The client cancelled the request while the orchestrator waited for a worker."""


class Cancellable(Protocol):
    def is_cancelled(self) -> bool: ...


async def unless_cancelled(request: Cancellable, work: Awaitable[T], poll_s: float = CANCEL_POLL_S) -> T:
    """`work`'s result; while it is pending, the client's cancellation is checked every `poll_s`
    and abandons it (raising ClientCancelled). A BLS read it abandons keeps its thread until the
    stop the caller sends ends the worker's stream (admission.py counts that thread)."""
    task = asyncio.ensure_future(work)
    try:
        while not (await asyncio.wait({task}, timeout=poll_s))[0]:
            if request.is_cancelled():
                raise ClientCancelled("the request was cancelled by the client")
    finally:
        if not task.done():
            task.cancel()
    return task.result()
