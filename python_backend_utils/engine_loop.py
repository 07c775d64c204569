"""Runs an engine on a background thread so a Triton `execute` only enqueues.

The engine is not thread-safe: every call into it happens on the loop thread, between steps.
Other threads hand work over as commands; outputs come back through per-request callbacks,
which run on the loop thread (a Triton response sender may be used from any thread).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

from python_backend_utils.engine import LLMEngine, RequestOutput
from python_backend_utils.errors import RequestAbortedError
from python_backend_utils.sampling import SamplingParams

logger = logging.getLogger(__name__)

# How long the loop sleeps when all it has are sequences waiting for KV to arrive.
_KV_POLL_INTERVAL_S = 0.001


@dataclass
class _Subscriber:
    on_output: Callable[[RequestOutput], None]
    is_cancelled: Callable[[], bool]
    on_error: Callable[[Exception], None] | None


class EngineLoop:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._subscribers: dict[str, _Subscriber] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._stopping = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(None)
        self._thread.join(timeout)

    def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        on_output: Callable[[RequestOutput], None],
        is_cancelled: Callable[[], bool] = lambda: False,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """Queue an aggregated request. Invalid requests raise here, in the caller's thread."""
        params.validate(len(prompt_ids), self.engine.max_model_len, self.engine.vocab_size)
        self.call_soon(
            lambda: self._admit(request_id, on_output, is_cancelled, on_error, self.engine.add_request,
                                request_id, prompt_ids, params)
        )

    def call_soon(self, command: Callable[[], None]) -> None:
        """Run `command` on the loop thread before the next step (the only safe way to touch the engine)."""
        self._commands.put(command)

    def subscribe(
        self,
        request_id: str,
        on_output: Callable[[RequestOutput], None],
        is_cancelled: Callable[[], bool] = lambda: False,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """Route a request's outputs to callbacks (loop thread only; `submit` does it for you)."""
        self._subscribers[request_id] = _Subscriber(on_output, is_cancelled, on_error)

    def _admit(self, request_id, on_output, is_cancelled, on_error, add, *args) -> None:
        try:
            add(*args)
        except Exception as error:  # noqa: BLE001 - the request fails, the loop goes on
            self._fail(_Subscriber(on_output, is_cancelled, on_error), error)
            return
        self.subscribe(request_id, on_output, is_cancelled, on_error)

    def _run(self) -> None:
        while not self._stopping:
            self._drain_commands(block=not self.engine.has_unfinished())
            self._drop_cancelled()
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # noqa: BLE001 - fail the batch, keep serving
                logger.exception("engine step failed; failing its requests")
                for request_id, subscriber in list(self._subscribers.items()):
                    self.engine.abort(request_id)
                    self._fail(subscriber, error)
                self._subscribers.clear()
                continue
            for output in outputs:
                self._deliver(output)
            if self.engine.last_step_num_tokens == 0:
                self._drain_commands(block=True, timeout=_KV_POLL_INTERVAL_S)

    def _deliver(self, output: RequestOutput) -> None:
        subscriber = self._subscribers.get(output.request_id)
        if subscriber is None:
            return
        if output.finished:
            del self._subscribers[output.request_id]
        try:
            subscriber.on_output(output)
        except Exception:  # noqa: BLE001 - one bad callback must not stop the loop
            logger.exception("output callback for %s failed; aborting it", output.request_id)
            self.engine.abort(output.request_id)
            self._subscribers.pop(output.request_id, None)

    def _drop_cancelled(self) -> None:
        for request_id, subscriber in list(self._subscribers.items()):
            if subscriber.is_cancelled():
                self.engine.abort(request_id)
                del self._subscribers[request_id]
                # The final flag still has to go out, or Triton waits on the request at unload.
                self._fail(subscriber, RequestAbortedError(f"request {request_id} was cancelled by the client"))

    def _drain_commands(self, block: bool, timeout: float | None = None) -> None:
        try:
            command = self._commands.get(timeout=timeout) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
        self._stopping = True

    @staticmethod
    def _fail(subscriber: _Subscriber, error: Exception) -> None:
        if subscriber.on_error is not None:
            try:
                subscriber.on_error(error)
            except Exception:  # noqa: BLE001
                logger.exception("error callback failed")
