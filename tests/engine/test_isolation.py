"""One request cannot hurt the others: its settings fail it alone, never the batch it shares a step with."""

from __future__ import annotations

import queue
from concurrent.futures import Future

import pytest
import torch

from python_backend_utils.engine.config import EngineConfig
from python_backend_utils.engine.engine import LLMEngine
from python_backend_utils.engine.loop import EngineLoop
from python_backend_utils.engine.sampler import sample, seeded_uniforms
from python_backend_utils.engine.sampling_params import SamplingParams
from python_backend_utils.engine.sequence import RequestType
from python_backend_utils.errors import InvalidRequestError
from tests.engine.checkpoints import build_tiny_checkpoint, reference_greedy, run_to_completion, tokens_of

VOCAB = 512  # the tiny checkpoint's
PROMPTS = {"a": [5, 6, 7, 8, 9], "b": [42] * 3, "c": list(range(100, 111))}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(build_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny") / "llama"))


@pytest.fixture(scope="module")
def reference(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    return {request_id: reference_greedy(model, prompt, 6) for request_id, prompt in PROMPTS.items()}


@pytest.fixture
def engine(tiny_dir):
    engine = LLMEngine(EngineConfig(model_dir=tiny_dir, dtype="float32", num_kv_blocks=64, block_size=4))
    yield engine
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def greedy(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def add_neighbours(engine: LLMEngine) -> None:
    for request_id, prompt in PROMPTS.items():
        engine.add_request(request_id, prompt, greedy())


def assert_neighbours_untouched(outputs, reference) -> None:
    for request_id in PROMPTS:
        assert tokens_of(outputs[request_id]) == reference[request_id], request_id
        assert outputs[request_id][-1].finish_reason == "length"


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1e-6])
def test_a_tiny_temperature_is_greedy_and_its_batch_goes_on(engine, reference, temperature):
    add_neighbours(engine)
    engine.add_request("tiny-t", PROMPTS["a"], SamplingParams(max_tokens=6, temperature=temperature, top_p=0.9,
                                                              ignore_eos=True, return_log_probs=True))
    outputs = run_to_completion(engine)
    assert_neighbours_untouched(outputs, reference)
    assert tokens_of(outputs["tiny-t"]) == reference["a"]
    assert all(lp <= 0 for o in outputs["tiny-t"] for lp in o.log_probs)


def test_rows_that_are_no_distribution_fall_back_to_argmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5],
                           [0.0, float("inf"), 3.0, 1.0],
                           [float("nan"), 1.0, 2.0, 0.0],
                           [0.0, 1e30, -1e30, 2.0]])
    params = [SamplingParams(temperature=0.7, top_k=3, seed=1)] * 4
    tokens = sample(logits, params, seeded_uniforms([1] * 4, [0] * 4)).tokens
    assert tokens.tolist()[1:] == [1, 0, 1]  # argmax (NaN counts as the largest): no error, a token for every row
    assert 0 <= tokens[0] < 4


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_bad_words_that_ban_the_whole_vocabulary_fail_that_request_alone(engine, reference, temperature):
    add_neighbours(engine)
    everything = tuple((token,) for token in range(VOCAB))
    engine.add_request("no-words-left", [3, 4], SamplingParams(max_tokens=6, temperature=temperature,
                                                               bad_words=everything, seed=3))
    outputs = run_to_completion(engine)
    assert_neighbours_untouched(outputs, reference)
    [failed] = outputs["no-words-left"]
    assert failed.finished and failed.finish_reason == "error" and not failed.token_ids
    assert isinstance(failed.error, InvalidRequestError) and "ban every token" in str(failed.error)


def test_bad_words_that_ban_everything_after_one_token_fail_only_there(engine, reference):
    """Multi-token words ban by context: the request fails at the step where nothing is left."""
    first = reference["a"][0]  # the tiny model repeats the prompt's last token: here [..., 9] -> 9
    assert PROMPTS["a"][-2:] != [first, first]
    engine.add_request("trap", PROMPTS["a"], SamplingParams(
        max_tokens=6, ignore_eos=True, bad_words=tuple((first, first, token) for token in range(VOCAB))))
    engine.add_request("b", PROMPTS["b"], greedy())
    outputs = run_to_completion(engine)
    assert tokens_of(outputs["trap"]) == [first]
    assert outputs["trap"][-1].finish_reason == "error" and "after 1 generated tokens" in str(outputs["trap"][-1].error)
    assert tokens_of(outputs["b"]) == reference["b"]


def test_the_loop_hands_a_request_its_own_error_and_serves_the_rest(tiny_dir, reference):
    loop = EngineLoop(LLMEngine(EngineConfig(model_dir=tiny_dir, dtype="float32", num_kv_blocks=64, block_size=4)))
    loop.start()
    try:
        errors: queue.Queue = queue.Queue()
        outputs: dict[str, queue.Queue] = {request_id: queue.Queue() for request_id in PROMPTS}
        everything = tuple((token,) for token in range(VOCAB))
        loop.submit("no-words-left", [3, 4], SamplingParams(temperature=1.0, bad_words=everything),
                    lambda output: errors.put(AssertionError(f"unexpected output {output}")), on_error=errors.put)
        for request_id, prompt in PROMPTS.items():
            loop.submit(request_id, prompt, greedy(), outputs[request_id].put)
        assert isinstance(errors.get(timeout=30), InvalidRequestError)
        for request_id, results in outputs.items():
            tokens = []
            while not (output := results.get(timeout=30)).finished:
                tokens += output.token_ids
            assert tokens + output.token_ids == reference[request_id]
    finally:
        loop.stop()


class WritingPull:
    """A KV pull as the engine sees it: until its future is done, data may land in its blocks."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.future: Future = Future()
        self.block_ids: list[int] = []
        self.data = torch.Generator().manual_seed(0)  # another request's KV, as far as this one is concerned

    def start(self, block_ids: list[int]) -> Future:
        self.block_ids = block_ids
        return self.future

    def land(self) -> None:
        """A receive completes: it writes its destination, whoever the engine gave it to since."""
        if not self.future.done():
            landing = self.engine.pool.tensor[self.block_ids]
            self.engine.pool.tensor[self.block_ids] = torch.randn(landing.shape, generator=self.data) * 100


@pytest.mark.parametrize("end", ["abort", "cancel-through-the-loop"])
def test_blocks_of_an_ended_request_stay_out_of_reach_until_its_pull_is_done(tiny_dir, reference, end):
    """Cancelling a request that waits for its KV once freed blocks its pull went on writing into,
    under whichever request took them next."""
    # 3 blocks for the ended request, 9 for its neighbours at their longest: they need the ended one's
    engine = LLMEngine(EngineConfig(model_dir=tiny_dir, dtype="float32", num_kv_blocks=10, block_size=4))
    pull = WritingPull(engine)
    engine.add_generation_request("waits", list(range(200, 211)), 7, greedy(), pull.start)
    engine.step()
    assert engine.stats().num_awaiting_kv == 1
    held = engine.stats().num_blocks - engine.stats().num_free_blocks
    if end == "abort":
        engine.abort("waits")
    else:
        loop = EngineLoop(engine)
        loop.stop_request("waits", "cancelled by the client")
        loop._drain_commands(block=False)  # what the loop thread does between steps (the thread is not started)
    assert engine.stats().num_free_blocks == engine.stats().num_blocks - held  # held aside, not free
    add_neighbours(engine)
    outputs: dict[str, list] = {}
    while len([o for results in outputs.values() for o in results if o.finished]) < len(PROMPTS):
        pull.land()
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    assert_neighbours_untouched(outputs, reference)
    pull.future.set_exception(ConnectionError("the context instance is gone"))
    assert run_to_completion(engine) == {}  # nothing of the ended request is ever emitted
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_an_abort_leaves_published_kv_to_its_release(engine):
    """A context request's held KV may be read by a peer at any moment: only the transfer agent's
    release frees it, whatever else ends the request."""
    engine.add_request("held", list(range(30, 41)), greedy(), request_type=RequestType.CONTEXT_ONLY)
    [handoff] = run_to_completion(engine)["held"]
    used = engine.stats().num_blocks - engine.stats().num_free_blocks
    assert used == len(handoff.kv_block_ids) > 0
    engine.abort("held")
    assert engine.stats().num_blocks - engine.stats().num_free_blocks == used
    engine.release_kv("held")
