"""Top and prompt log-probabilities cross Triton as tensors and come back as they were."""

from __future__ import annotations

import numpy as np
import pytest

from python_backend_utils.engine.sampling_params import SamplingParams
from python_backend_utils.triton_glue.io import (
    GenerationRequest,
    ResponseAssembler,
    joined_outputs,
    prompt_log_probs_of,
    top_log_probs_of,
)

TOP = [[(5, -0.25), (9, -1.5)], [(7, -0.5), (5, -2.0)]]
PROMPT = [(-3.0, [(1, -0.75), (2, -1.0)]), (-0.5, [(4, -0.5), (1, -3.0)])]


def assembler(streaming: bool) -> ResponseAssembler:
    params = SamplingParams(top_logprobs=2, prompt_log_probs=True)
    return ResponseAssembler(GenerationRequest([1, 4, 6], params, streaming=streaming, exclude_input_in_output=True))


def test_a_workers_responses_rebuild_the_same_answer_through_the_orchestrator():
    worker = assembler(streaming=True)
    first = worker.add([5], [-0.25], False, TOP[:1], PROMPT).tensors
    second = worker.add([7], [-0.5], True, TOP[1:], []).tensors
    assert top_log_probs_of(first) == TOP[:1] and prompt_log_probs_of(first) == PROMPT
    assert prompt_log_probs_of(second) == []  # the prompt's come once
    middle = assembler(streaming=False)
    assert middle.add_outputs(first, False) is None
    whole = middle.add_outputs(second, True).tensors
    assert whole["output_ids"].tolist() == [5, 7]
    assert top_log_probs_of(whole) == TOP and prompt_log_probs_of(whole) == PROMPT
    joined = joined_outputs([first, second])
    assert joined["output_ids"].tolist() == [5, 7] and top_log_probs_of(joined) == TOP


def test_no_alternatives_asked_makes_empty_tensors():
    plain = ResponseAssembler(GenerationRequest([1], SamplingParams(), streaming=True, exclude_input_in_output=True))
    tensors = plain.add([3], [], True).tensors
    assert tensors["top_log_prob_ids"].shape == (1, 0) and tensors["prompt_log_probs"].shape == (0,)
    assert top_log_probs_of(tensors) == [[]] and prompt_log_probs_of(tensors) == []
    assert np.isfinite(tensors["output_log_probs"]).all()


@pytest.mark.parametrize("width", [1, 2])
def test_alternatives_are_cut_to_the_width_asked(width):
    worker = ResponseAssembler(GenerationRequest([1], SamplingParams(top_logprobs=width), streaming=True,
                                                 exclude_input_in_output=True))
    assert top_log_probs_of(worker.add([5], [-0.25], True, TOP[:1]).tensors) == [TOP[0][:width]]
