"""The worker model without a server: a real engine on a tiny checkpoint behind each role, driven through
`execute` as the stub drives it, with the stand-in pb_utils (tests/pb_utils_stand_in.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from python_backend_utils.serving import worker_model
from python_backend_utils.serving.worker_model import LLMModel
from tests import pb_utils_stand_in as pb_utils
from tests.engine.checkpoints import build_tiny_checkpoint, reference_greedy

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 300, 2, 77, 19, 8, 401, 23]  # more than a 16-token block
VOCAB = 512
WAIT_S = 60


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("key") / "deployment.key"
    path.write_bytes(b"k" * 32)
    return path


@pytest.fixture(scope="module")
def models(checkpoint, key_file):
    """One model of each role, as three Triton instances of one deployment would be. Not stubs: they do not
    tie this test process's life to its parent's as a stub ties its to its tritonserver's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(worker_model, "exit_with_server", lambda: None)
        loaded = {role: load(role, checkpoint, key_file) for role in ("aggregated", "context", "generation")}
    yield loaded
    for model in loaded.values():
        model.finalize()


def load(role: str, checkpoint: Path, key_file: Path) -> LLMModel:
    parameters = {"model_dir": str(checkpoint), "dtype": "float32", "kv_cache_memory_bytes": str(4 << 20),
                  "kv_key_file": str(key_file), "kv_use_shared_memory": "true"}
    config = {"parameters": {name: {"string_value": value} for name, value in parameters.items()},
              "instance_group": [{"count": 1, "kind": "KIND_CPU"}]}
    model = type(f"{role.title()}Model", (LLMModel,), {"role": role})()
    model.initialize({"model_config": json.dumps(config), "model_name": role, "model_version": "1",
                      "model_instance_name": f"{role}_0_0"})
    return model


def request(prompt: list[int] = PROMPT, max_tokens: int = 8, request_id: str = "", **inputs) -> pb_utils.ClientRequest:
    arrays = {"input_ids": np.array(prompt, np.int32), "request_output_len": np.array([max_tokens], np.int32),
              "streaming": np.array([True]), "exclude_input_in_output": np.array([True]), **inputs}
    return pb_utils.ClientRequest(arrays, request_id)


def run(model: LLMModel, *requests: pb_utils.ClientRequest) -> None:
    model.execute(list(requests))
    for sent in requests:
        assert sent.sender.done.wait(WAIT_S), "no final response"


def reference(checkpoint: Path, max_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    return reference_greedy(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), PROMPT, max_tokens)


def test_aggregated_streams_the_greedy_tokens_of_transformers(models, checkpoint):
    sent = request(max_tokens=8, return_log_probs=np.array([True]))
    run(models["aggregated"], sent)
    assert sent.sender.error() is None
    assert sent.sender.tokens() == reference(checkpoint, 8)
    log_probs = sent.sender.outputs("output_log_probs")
    assert len(log_probs) == 8 and all(p <= 0 for p in log_probs)


@pytest.mark.parametrize(("inputs", "message"), [
    ({"input_ids": None}, "input_ids is required"),
    ({"input_ids": np.array([1, VOCAB], np.int32)}, f"token id {VOCAB}, outside the vocabulary"),
    ({"request_output_len": np.array([0], np.int32)}, "max_tokens must be at least 1"),
    ({"temperature": np.array([-1.0], np.float32)}, "temperature must be a finite number >= 0"),
])
def test_bad_input_is_the_clients_error_and_the_model_keeps_serving(models, inputs, message):
    bad = request()
    for name, value in inputs.items():
        if value is None:
            del bad._inputs[name]
        else:
            bad._inputs[name] = value
    good = request(max_tokens=2)
    run(models["aggregated"], bad, good)
    assert bad.sender.error().code() == pb_utils.TritonError.INVALID_ARG
    assert message in bad.sender.error().message()
    assert good.sender.error() is None and len(good.sender.tokens()) == 2


def test_a_stop_with_the_same_request_id_ends_a_request_in_flight(models):
    long = request(max_tokens=400, request_id="req-1")
    models["aggregated"].execute([long])
    stop = request(request_id="req-1", stop=np.array([True]))
    run(models["aggregated"], stop)
    assert long.sender.done.wait(WAIT_S)
    assert long.sender.error().code() == pb_utils.TritonError.CANCELLED
    assert len(long.sender.tokens()) < 400
    assert stop.sender.responses == [(None, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)]


def test_the_generation_role_pulls_the_context_roles_kv_and_continues_as_aggregated(models):
    prefill = request(max_tokens=8)
    run(models["context"], prefill)
    [first] = prefill.sender.tokens()
    [params] = [t.as_numpy() for r, _ in prefill.sender.responses for t in r.output_tensors()
                if t.name() == "context_phase_params"]
    decode = request(max_tokens=8, context_phase_params=params)
    whole = request(max_tokens=8)
    run(models["generation"], decode)
    run(models["aggregated"], whole)
    assert [first, *decode.sender.tokens()] == whole.sender.tokens()
    assert models["generation"].kv_exchange.metrics()["pulls_completed"] >= 1


def test_tampered_context_phase_params_are_refused_and_counted(models):
    prefill = request(max_tokens=4)
    run(models["context"], prefill)
    [params] = [t.as_numpy().copy() for r, _ in prefill.sender.responses for t in r.output_tensors()
                if t.name() == "context_phase_params"]
    params[-1] ^= 0xFF  # the MAC no longer matches
    forged = request(max_tokens=4, context_phase_params=params)
    rejected_before = models["generation"].params_rejected
    run(models["generation"], forged)
    assert forged.sender.error().code() == pb_utils.TritonError.INVALID_ARG
    assert models["generation"].params_rejected == rejected_before + 1
