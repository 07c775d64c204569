"""The engine loop thread: outputs and errors reach each request's callbacks; nothing one request or
command raises ends it, and if it ends anyway, that is seen."""

from __future__ import annotations

import queue

import pytest

from python_backend_utils.engine.config import EngineConfig
from python_backend_utils.engine.engine import LLMEngine
from python_backend_utils.engine.loop import EngineLoop
from python_backend_utils.engine.sampling_params import SamplingParams
from python_backend_utils.errors import EngineDeadError
from tests.engine.checkpoints import build_tiny_checkpoint


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    checkpoint = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny"))
    engine_loop = EngineLoop(LLMEngine(EngineConfig(model_dir=str(checkpoint), num_kv_blocks=64, block_size=16)))
    engine_loop.start()
    yield engine_loop
    engine_loop.stop()


def test_a_failing_output_callback_ends_its_request_with_that_error(loop):
    errors: queue.Queue = queue.Queue()

    def broken(output):
        raise TypeError("cannot encode this output")

    loop.submit("broken", [5, 6, 7], SamplingParams(max_tokens=4), broken, on_error=errors.put)
    error = errors.get(timeout=30)
    assert isinstance(error, TypeError) and "cannot encode" in str(error)
    outputs: queue.Queue = queue.Queue()
    loop.submit("healthy", [5, 6, 7], SamplingParams(max_tokens=2), outputs.put)
    while not (output := outputs.get(timeout=30)).finished:
        assert output.token_ids
    stats: queue.Queue = queue.Queue()
    loop.call_soon(lambda: stats.put(loop.engine.stats()))
    idle = stats.get(timeout=30)
    assert idle.num_free_blocks == idle.num_blocks  # the failed request's blocks came back


def served(loop: EngineLoop, request_id: str) -> list[int]:
    outputs: queue.Queue = queue.Queue()
    loop.submit(request_id, [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), outputs.put)
    tokens = []
    while not (output := outputs.get(timeout=30)).finished:
        tokens += output.token_ids
    return tokens + output.token_ids


def test_a_failing_command_does_not_end_the_loop(loop):
    def broken():
        raise KeyError("a release of a request the engine never had")

    loop.call_soon(broken)
    assert len(served(loop, "after-a-broken-command")) == 3


def test_a_request_whose_cancellation_cannot_be_asked_ends_alone(loop):
    errors: queue.Queue = queue.Queue()

    def unanswerable() -> bool:
        raise ConnectionError("the server is gone")

    loop.submit("unaskable", [5, 6, 7], SamplingParams(max_tokens=500), lambda output: None, unanswerable, errors.put)
    assert isinstance(errors.get(timeout=30), ConnectionError)
    assert len(served(loop, "next-to-it")) == 3


def test_a_dead_loop_fails_its_requests_refuses_new_ones_and_reports_it(tmp_path):
    checkpoint = build_tiny_checkpoint("llama", tmp_path / "tiny")
    deaths: queue.Queue = queue.Queue()
    dead_loop = EngineLoop(LLMEngine(EngineConfig(model_dir=str(checkpoint), num_kv_blocks=64, block_size=16)),
                           on_death=deaths.put)
    dead_loop.start()
    outputs: queue.Queue = queue.Queue()
    errors: queue.Queue = queue.Queue()
    dead_loop.submit("in-flight", [5, 6, 7], SamplingParams(max_tokens=500), outputs.put, on_error=errors.put)
    outputs.get(timeout=30)  # it is decoding

    def end_the_thread():
        raise SystemExit("what no `except Exception` catches")

    dead_loop.call_soon(end_the_thread)
    assert isinstance(deaths.get(timeout=30), SystemExit)
    assert isinstance(errors.get(timeout=30), EngineDeadError)
    with pytest.raises(EngineDeadError, match="engine loop stopped"):
        dead_loop.submit("too-late", [5, 6, 7], SamplingParams(), outputs.put)


def test_stopping_fails_the_requests_in_flight_and_refuses_new_ones(tmp_path):
    """A model unloads with streams open: each hears the end (its response sender is closed while
    the model is still loaded, issue 21), and nothing is queued to a loop that is gone."""
    checkpoint = build_tiny_checkpoint("llama", tmp_path / "tiny")
    engine_loop = EngineLoop(LLMEngine(EngineConfig(model_dir=str(checkpoint), num_kv_blocks=64, block_size=16)))
    engine_loop.start()
    outputs: queue.Queue = queue.Queue()
    errors: queue.Queue = queue.Queue()
    engine_loop.submit("long", [5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True), outputs.put,
                       on_error=errors.put)
    outputs.get(timeout=30)  # it is decoding
    engine_loop.stop()
    error = errors.get(timeout=5)
    assert isinstance(error, EngineDeadError) and "unloading" in str(error)
    with pytest.raises(EngineDeadError):
        engine_loop.submit("late", [5, 6, 7], SamplingParams(max_tokens=2), outputs.put)
