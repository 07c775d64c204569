"""The engine loop thread: outputs and errors reach each request's callbacks."""

from __future__ import annotations

import queue

import pytest

from python_backend_utils.engine.config import EngineConfig
from python_backend_utils.engine.engine import LLMEngine
from python_backend_utils.engine.loop import EngineLoop
from python_backend_utils.engine.sampling_params import SamplingParams
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
