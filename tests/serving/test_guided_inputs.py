"""The structured-output inputs (TensorRT-LLM's guided_decoding_guide_type / guided_decoding_guide)."""

from __future__ import annotations

import numpy as np
import pytest

from python_backend_utils.engine.sampling_params import GuidedDecoding
from python_backend_utils.errors import InvalidRequestError
from python_backend_utils.triton_glue.io import generation_request

PROMPT = {"input_ids": np.array([1, 2, 3], np.int32)}


def strings(*values: str) -> np.ndarray:
    return np.array([value.encode() for value in values], np.object_)


def test_the_guide_reaches_the_sampling_params():
    request = generation_request({**PROMPT, "guided_decoding_guide_type": strings("regex"),
                                  "guided_decoding_guide": strings("[0-9]+")})
    assert request.params.guided_decoding == GuidedDecoding("regex", "[0-9]+")
    assert generation_request({**PROMPT, "guided_decoding_guide_type": strings("json")}).params.guided_decoding \
        == GuidedDecoding("json", "")
    assert generation_request(PROMPT).params.guided_decoding is None


@pytest.mark.parametrize("inputs, message", [
    ({"guided_decoding_guide": strings("[0-9]+")}, "needs guided_decoding_guide_type"),
    ({"guided_decoding_guide_type": strings("regex", "json")}, "exactly one value"),
    ({"guided_decoding_guide_type": np.array([b"\xff"], np.object_)}, "not valid UTF-8"),
])
def test_malformed_guide_inputs_are_invalid_requests(inputs, message):
    with pytest.raises(InvalidRequestError, match=message):
        generation_request({**PROMPT, **inputs})
