"""Structured output in the engine: the batched mask step, and answers that follow their grammar
through the aggregated, context-only and generation-only roles."""

from __future__ import annotations

import json
from concurrent.futures import Future

import jsonschema
import pytest
import torch

from python_backend_utils.engine.config import EngineConfig
from python_backend_utils.engine.engine import LLMEngine
from python_backend_utils.engine.grammar import Grammars, GrammarViolationError, apply_grammar_masks
from python_backend_utils.engine.sampling_params import GuidedDecoding, SamplingParams
from python_backend_utils.engine.sequence import RequestType
from python_backend_utils.environment import default_model_dir
from python_backend_utils.errors import InvalidRequestError
from tests.engine.checkpoints import run_to_completion, tokens_of

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "population": {"type": "integer", "minimum": 0,
                                                                             "maximum": 10**8}},
    "required": ["city", "population"],
}
GUIDE = GuidedDecoding("json_schema", json.dumps(SCHEMA))
PROMPT = "<|im_start|>user\nDescribe Paris as JSON.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    return Grammars(default_model_dir(), 49152, [tokenizer.eos_token_id])


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=str(default_model_dir()), num_kv_blocks=128, block_size=16))


def test_the_mask_step_leaves_unguided_rows_alone_and_allows_only_what_the_grammar_does(grammars, tokenizer):
    logits = torch.randn(3, 49152, generator=torch.Generator().manual_seed(0))
    original = logits.clone()
    regex = grammars.matcher(GuidedDecoding("regex", "(yes|no)"))
    apply_grammar_masks(logits, [None, regex, None])
    assert torch.equal(logits[0], original[0]) and torch.equal(logits[2], original[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(("yes".startswith(t) or "no".startswith(t)) and t for t in map(tokenizer.decode, allowed))
    assert torch.equal(logits[1, allowed], original[1, allowed])


def test_a_matcher_advances_with_each_token_and_terminates_on_the_end_token(grammars, tokenizer):
    matcher = grammars.matcher(GuidedDecoding("regex", "(yes|no)"))
    for token in tokenizer.encode("yes", add_special_tokens=False):
        matcher.advance(token)
    assert not matcher.terminated
    with pytest.raises(GrammarViolationError):
        matcher.advance(tokenizer.encode("x", add_special_tokens=False)[0])
    matcher.advance(tokenizer.eos_token_id)
    assert matcher.terminated


def test_a_complete_grammar_allows_only_the_requests_own_end_token(grammars, tokenizer):
    matcher = grammars.matcher(GuidedDecoding("regex", "(yes|no)"), end_id=5)
    for token in tokenizer.encode("no", add_special_tokens=False):
        matcher.advance(token)
    with pytest.raises(GrammarViolationError):
        matcher.advance(tokenizer.eos_token_id)
    matcher.advance(5)
    assert matcher.terminated


def test_a_guide_is_compiled_once(grammars):
    assert grammars.compile(GuidedDecoding("json_schema", json.dumps(SCHEMA))) is grammars.compile(GUIDE)


@pytest.mark.parametrize("guide, message", [
    (GuidedDecoding("json_schema", "{not json"), "not JSON"),
    (GuidedDecoding("json_schema", '{"type": "object", "properties": 3}'), "properties must be an object"),
    (GuidedDecoding("regex", "a(b"), "not a valid regex"),
    (GuidedDecoding("ebnf_grammar", "root ::= undefined_rule"), "not defined"),
])
def test_an_invalid_guide_is_an_invalid_request_naming_the_problem(grammars, guide, message):
    with pytest.raises(InvalidRequestError, match=message):
        grammars.compile(guide)


@pytest.mark.parametrize("guide", [GuidedDecoding("yaml", "x"), GuidedDecoding("regex", "")])
def test_guided_decoding_settings_are_validated(guide):
    with pytest.raises(InvalidRequestError, match="guided_decoding"):
        SamplingParams(guided_decoding=guide).validate(4, 100, 49152)


def sampled(seed: int, max_tokens: int = 48) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, guided_decoding=GUIDE)


def test_sampled_answers_validate_against_their_schema(engine, tokenizer):
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    for seed in range(4):
        engine.add_request(f"r{seed}", prompt, sampled(seed))
    engine.add_request("free", prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=0))
    outputs = run_to_completion(engine)
    for seed in range(4):
        assert outputs[f"r{seed}"][-1].finish_reason == "stop"
        jsonschema.validate(json.loads(tokenizer.decode(tokens_of(outputs[f"r{seed}"]))), SCHEMA)


def test_a_complete_grammar_ends_the_answer_whatever_min_tokens_and_ignore_eos_say(engine, tokenizer):
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    choice = GuidedDecoding("regex", "(yes|no)")
    engine.add_request("forced", prompt, SamplingParams(max_tokens=20, min_tokens=20, ignore_eos=True,
                                                        guided_decoding=choice))
    [*_, last] = outputs = run_to_completion(engine)["forced"]
    assert last.finish_reason == "stop" and tokenizer.decode(tokens_of(outputs)) in ("yes", "no")


def test_the_generation_role_continues_the_grammar_from_the_context_roles_first_token(engine, tokenizer):
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    engine.add_request("whole", prompt, sampled(7))
    whole = tokens_of(run_to_completion(engine)["whole"])
    engine.add_request("ctx", prompt, sampled(7), request_type=RequestType.CONTEXT_ONLY)
    [first] = run_to_completion(engine)["ctx"]
    engine.release_kv("ctx")
    assert first.token_ids == whole[:1]

    def recompute(block_ids: list[int]) -> Future:  # no KV to pull: the prompt is recomputed here
        failed = Future()
        failed.set_exception(RuntimeError("no context instance in this test"))
        return failed

    engine.add_generation_request("gen", prompt, first.token_ids[0], sampled(7), recompute)
    rest = tokens_of(run_to_completion(engine)["gen"])
    text = tokenizer.decode(first.token_ids + rest)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_a_first_token_outside_the_grammar_fails_the_generation_request(engine, tokenizer):
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    not_json = tokenizer.encode("Hello", add_special_tokens=False)[0]
    with pytest.raises(GrammarViolationError):
        engine.add_generation_request("bad", prompt, not_json, sampled(0), lambda blocks: Future())
    assert not engine.has_unfinished()
