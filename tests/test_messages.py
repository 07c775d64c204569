"""context_phase_params round-trips and refuses anything malformed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from python_backend_utils.messages import ContextPhaseParams, MalformedContextParamsError

SAMPLE = ContextPhaseParams("context/1", 42, 17, b"\x01handle-bytes")


def test_round_trip():
    assert ContextPhaseParams.from_bytes(SAMPLE.to_bytes()) == SAMPLE


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:10],  # truncated header
        lambda b: b[:-1],  # truncated body
        lambda b: b + b"x",  # trailing bytes
        lambda b: b"XXXX" + b[4:],  # foreign magic
        lambda b: b[:12] + (0xFFFF).to_bytes(2, "little") + b[14:],  # oversized name length
    ],
)
def test_malformed_is_refused(mutate):
    with pytest.raises(MalformedContextParamsError):
        ContextPhaseParams.from_bytes(mutate(SAMPLE.to_bytes()))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_either_parse_or_raise_the_specific_error(data):
    try:
        parsed = ContextPhaseParams.from_bytes(data)
    except MalformedContextParamsError:
        return
    assert parsed.to_bytes() == data


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40), st.integers(0, 2**32 - 1), st.integers(1, 2**32 - 1), st.binary(max_size=300))
def test_any_valid_message_round_trips(name, token, prompt_tokens, handle):
    message = ContextPhaseParams(name, token, prompt_tokens, handle)
    assert ContextPhaseParams.from_bytes(message.to_bytes()) == message
