"""context_phase_params round-trips, refuses anything malformed, and only verifies under its key and prompt.

Arbitrary and mutated bytes are fuzzed in test_fuzz_parsers.py.
"""

from __future__ import annotations

import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.server import session_key_file
from python_backend_utils.environment import KEY_FILE_ENV
from python_backend_utils.serving.context_params import (
    KEY_FILE_PARAMETER,
    ContextPhaseParams,
    DeploymentKeyError,
    ForgedContextParamsError,
    MalformedContextParamsError,
    load_deployment_key,
)

KEY = bytes(range(32))
PROMPT = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584]
SAMPLE = ContextPhaseParams("context/1", 42, len(PROMPT), b"\x01handle-bytes")


def test_round_trip():
    assert ContextPhaseParams.from_bytes(SAMPLE.to_bytes(KEY, PROMPT), KEY, PROMPT) == SAMPLE


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:10], "fewer than its header and authentication tag"),
        (lambda b: b[:-1], "its header declares"),
        (lambda b: b + b"x", "its header declares"),
        (lambda b: b"CPP1" + b[4:], "not produced by a context model of this version"),
        (lambda b: b[:12] + (0xFFFF).to_bytes(2, "little") + b[14:], "oversized field"),
    ],
    ids=["truncated-header", "truncated", "trailing-byte", "old-or-foreign-magic", "oversized-name"],
)
def test_malformed_is_refused_before_authentication(mutate, message):
    with pytest.raises(MalformedContextParamsError, match=message) as raised:
        ContextPhaseParams.from_bytes(mutate(SAMPLE.to_bytes(KEY, PROMPT)), KEY, PROMPT)
    assert not isinstance(raised.value, ForgedContextParamsError)


@pytest.mark.parametrize(
    ("key", "prompt", "mutate"),
    [
        (b"another deployment's key, 32 b..", PROMPT, lambda b: b),
        (KEY, PROMPT[:-1] + [1], lambda b: b),  # same length, another prompt
        (KEY, PROMPT, lambda b: b[:-33] + bytes([b[-33] ^ 1]) + b[-32:]),  # the handle altered
        (KEY, PROMPT, lambda b: b[:4] + (7).to_bytes(4, "little") + b[8:]),  # the first token altered
        (KEY, PROMPT, lambda b: b[:-32] + bytes(32)),  # the tag replaced
    ],
    ids=["other-key", "other-prompt", "altered-handle", "altered-first-token", "zero-tag"],
)
def test_forged_or_altered_params_fail_authentication(key, prompt, mutate):
    with pytest.raises(ForgedContextParamsError, match="failed authentication"):
        ContextPhaseParams.from_bytes(mutate(SAMPLE.to_bytes(KEY, PROMPT)), key, prompt)


def test_signed_for_a_longer_prompt_is_not_accepted_for_a_shorter_one():
    with pytest.raises(ForgedContextParamsError):
        ContextPhaseParams.from_bytes(SAMPLE.to_bytes(KEY, PROMPT), KEY, PROMPT[:5])


def test_authentic_but_inconsistent_params_are_malformed():
    for value in (ContextPhaseParams("c", 1, 0, b"h"), ContextPhaseParams("c", 1, 3, b"h")):
        with pytest.raises(MalformedContextParamsError, match="covers"):
            ContextPhaseParams.from_bytes(value.to_bytes(KEY, PROMPT), KEY, PROMPT)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.text(max_size=40), st.integers(0, 2**32 - 1), st.binary(max_size=300),
       st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=50))
def test_any_valid_message_round_trips(name, token, handle, prompt):
    message = ContextPhaseParams(name, token, len(prompt), handle)
    assert ContextPhaseParams.from_bytes(message.to_bytes(KEY, prompt), KEY, prompt) == message


def test_deployment_key_from_the_environment_or_the_parameter(tmp_path):
    env_key, parameter_key = tmp_path / "env.key", tmp_path / "param.key"
    env_key.write_text("a" * 64 + "\n")
    parameter_key.write_bytes(bytes(range(40)) + b"z")
    assert load_deployment_key({}, {KEY_FILE_ENV: str(env_key)}) == b"a" * 64
    assert load_deployment_key({KEY_FILE_PARAMETER: str(parameter_key)}, {KEY_FILE_ENV: str(env_key)}) == \
        bytes(range(40)) + b"z"
    assert load_deployment_key({KEY_FILE_PARAMETER: ""}, {KEY_FILE_ENV: str(env_key)}) == b"a" * 64


def test_missing_short_or_unreadable_key_is_a_clear_error(tmp_path):
    with pytest.raises(DeploymentKeyError, match=f"set {KEY_FILE_ENV}"):
        load_deployment_key({}, {})
    short = tmp_path / "short.key"
    short.write_text("too short")
    with pytest.raises(DeploymentKeyError, match="has 9 bytes; use at least 32"):
        load_deployment_key({}, {KEY_FILE_ENV: str(short)})
    with pytest.raises(DeploymentKeyError, match="cannot read the deployment key file"):
        load_deployment_key({}, {KEY_FILE_ENV: str(tmp_path / "absent.key")})


def test_launcher_key_is_private_random_and_one_per_process():
    path = session_key_file()
    assert session_key_file() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    key = load_deployment_key({}, {KEY_FILE_ENV: str(path)})
    assert len(key) == 64 and int(key, 16)
