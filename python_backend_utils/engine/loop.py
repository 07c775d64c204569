"""Runs an engine on a background thread so a Triton `execute` only enqueues.

The engine is not thread-safe: every call into it happens on the loop thread, between steps.
Other threads hand work over as commands; outputs come back through per-request callbacks,
which run on the loop thread (a Triton response sender may be used from any thread).

Whatever one request or command raises fails that request or command only. Should the thread
end anyway, every request it had is failed, new ones are refused and `on_death` is called: the
instance never looks alive with nothing serving it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from python_backend_utils.engine.engine import LLMEngine
from python_backend_utils.engine.outputs import RequestOutput
from python_backend_utils.engine.parallel import RankGroupError
from python_backend_utils.engine.sampling_params import SamplingParams
from python_backend_utils.engine.sequence import RequestType, StartPull
from python_backend_utils.errors import EngineDeadError, RequestAbortedError

logger = logging.getLogger(__name__)

# How long the loop sleeps when all it has are sequences waiting for KV to arrive.
_KV_POLL_INTERVAL_S = 0.001
# is_cancelled() is a round trip to the Triton server per request: ask at most this often.
_CANCEL_POLL_INTERVAL_S = 0.02
# How often `on_tick` (metrics publishing) runs, busy or idle.
_TICK_INTERVAL_S = 0.25


@dataclass
class _Subscriber:
    on_output: Callable[[RequestOutput], None]
    is_cancelled: Callable[[], bool]
    on_error: Callable[[Exception], None] | None


class EngineLoop:
    def __init__(self, engine: LLMEngine, on_tick: Callable[[], None] | None = None,
                 on_death: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self._on_tick = on_tick
        self._on_death = on_death
        self.death: BaseException | None = None  # what ended the loop thread, if it ended unasked
        self._lock = threading.Lock()  # guards `death` and `_admitting`
        self._admitting: dict[int, _Subscriber] = {}  # submitted, not yet admitted by the loop thread
        self._next_tick = 0.0
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._subscribers: dict[str, _Subscriber] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._stopping = False
        self._next_cancel_poll = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread; requests still in flight fail with EngineDeadError, so each client
        hears the end and each response sender is closed while its model is still loaded."""
        self._stopping = True
        self._commands.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("the engine loop did not stop within %g s; its requests are left as they are", timeout)
            return
        stopped = EngineDeadError("this instance is unloading; send the request again")
        with self._lock:
            self.death = stopped  # and new requests are refused
            admitting, self._admitting = list(self._admitting.values()), {}
        for subscriber in [*self._subscribers.values(), *admitting]:
            self._fail(subscriber, stopped)
        self._subscribers.clear()

    def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        on_output: Callable[[RequestOutput], None],
        is_cancelled: Callable[[], bool] = lambda: False,
        on_error: Callable[[Exception], None] | None = None,
        request_type: RequestType = RequestType.CONTEXT_AND_GENERATION,
    ) -> None:
        """Queue a request prefilled here (aggregated or context-only).

        Invalid requests raise here, in the caller's thread (which also compiles a grammar, so
        the loop does not wait for it)."""
        self._check(prompt_ids, params)
        self._submit(request_id, _Subscriber(on_output, is_cancelled, on_error),
                     lambda: self.engine.add_request(request_id, prompt_ids, params, request_type))

    def submit_generation(
        self,
        request_id: str,
        prompt_ids: list[int],
        first_token: int,
        params: SamplingParams,
        start_pull: StartPull,
        on_output: Callable[[RequestOutput], None],
        is_cancelled: Callable[[], bool] = lambda: False,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """Queue a generation-only request (see LLMEngine.add_generation_request)."""
        self._check(prompt_ids, params)
        self._submit(request_id, _Subscriber(on_output, is_cancelled, on_error),
                     lambda: self.engine.add_generation_request(
                         request_id, prompt_ids, first_token, params, start_pull))

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        params.validate(len(prompt_ids), self.engine.max_model_len, self.engine.vocab_size)
        if params.guided_decoding is not None:
            self.engine.grammars.compile(params.guided_decoding)

    def stop_request(self, request_id: str, reason: str) -> None:
        """Abort a request from any thread; its subscriber gets RequestAbortedError(reason)."""
        self.call_soon(lambda: self._abort(request_id, reason))

    def call_soon(self, command: Callable[[], None]) -> None:
        """Run `command` on the loop thread before the next step (the only safe way to touch the engine)."""
        self._commands.put(command)

    def _submit(self, request_id: str, subscriber: _Subscriber, add: Callable[[], None]) -> None:
        with self._lock:
            if self.death is not None:
                raise EngineDeadError(f"this instance's engine loop stopped ({self.death!r}); it is restarting")
            self._admitting[id(subscriber)] = subscriber
        self.call_soon(lambda: self._admit(request_id, subscriber, add))

    def _admit(self, request_id: str, subscriber: _Subscriber, add: Callable[[], None]) -> None:
        with self._lock:
            del self._admitting[id(subscriber)]
        try:
            add()
        except Exception as error:  # noqa: BLE001 - the request fails, the loop goes on
            self._fail(subscriber, error)
            return
        self._subscribers[request_id] = subscriber

    def _abort(self, request_id: str, reason: str) -> None:
        # The final flag still has to go out, or Triton waits on the request at unload.
        self._end(request_id, RequestAbortedError(reason))

    def _end(self, request_id: str, error: Exception) -> None:
        """Drop one request from the engine and tell its client why."""
        self.engine.abort(request_id)
        subscriber = self._subscribers.pop(request_id, None)
        if subscriber is not None:
            self._fail(subscriber, error)

    def _run(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._iterate()
                except RankGroupError:  # a parallel engine lost a rank: end, so that the instance is reloaded
                    raise
                except Exception as error:  # noqa: BLE001 - an engine bug: fail what is in flight, keep serving
                    logger.exception("engine loop iteration failed; failing every request in flight")
                    for request_id in list(self._subscribers):
                        self._end(request_id, error)
        except BaseException as error:  # noqa: BLE001 - logged with its traceback in _die, the thread ends
            self._die(error)

    def _iterate(self) -> None:
        self._tick()
        idle = not self.engine.has_unfinished()
        self._drain_commands(block=idle, timeout=_TICK_INTERVAL_S if idle and self._on_tick else None)
        self._drop_cancelled()
        if not self.engine.has_unfinished():
            return
        for output in self.engine.step():
            self._deliver(output)
        if self.engine.last_step_num_tokens == 0:
            self._drain_commands(block=True, timeout=_KV_POLL_INTERVAL_S)

    def _die(self, error: BaseException) -> None:
        """The thread is ending unasked: fail every request it had, refuse new ones, report it."""
        logger.critical("the engine loop died; failing its requests", exc_info=error)
        with self._lock:
            self.death = error
            admitting, self._admitting = list(self._admitting.values()), {}
        dead = EngineDeadError(f"this instance's engine loop stopped ({error!r}); it is restarting")
        for subscriber in [*self._subscribers.values(), *admitting]:
            self._fail(subscriber, dead)
        self._subscribers.clear()
        if self._on_death is not None:
            self._on_death(error)

    def _tick(self) -> None:
        now = time.monotonic()
        if self._on_tick is None or now < self._next_tick:
            return
        self._next_tick = now + _TICK_INTERVAL_S
        try:
            self._on_tick()
        except Exception:  # noqa: BLE001 - metrics must never stop serving
            logger.exception("on_tick failed")

    def _deliver(self, output: RequestOutput) -> None:
        subscriber = self._subscribers.get(output.request_id)
        if subscriber is None:
            return
        if output.finished:
            del self._subscribers[output.request_id]
        if output.error is not None:
            self._fail(subscriber, output.error)
            return
        try:
            subscriber.on_output(output)
        except Exception as error:  # noqa: BLE001 - one bad callback must not stop the loop
            logger.exception("output callback for %s failed; aborting it", output.request_id)
            self.engine.abort(output.request_id)
            self._subscribers.pop(output.request_id, None)
            self._fail(subscriber, error)  # the client hears of it instead of waiting for its timeout

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        if now < self._next_cancel_poll:
            return
        self._next_cancel_poll = now + _CANCEL_POLL_INTERVAL_S
        for request_id, subscriber in list(self._subscribers.items()):
            try:
                cancelled = subscriber.is_cancelled()
            except Exception as error:  # noqa: BLE001 - a request that cannot be asked about ends alone
                logger.exception("asking whether %s was cancelled failed; ending it", request_id)
                self._end(request_id, error)
                continue
            if cancelled:
                self._abort(request_id, f"request {request_id} was cancelled by the client")

    def _drain_commands(self, block: bool, timeout: float | None = None) -> None:
        try:
            command = self._commands.get(timeout=timeout) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            try:
                command()
            except Exception:  # noqa: BLE001 - one failed command must not end the loop
                logger.exception("engine loop command failed")
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
