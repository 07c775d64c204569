"""A tensor-parallel `aggregated` instance behind the real ensemble: `--set aggregated.tensor_parallel_size=2`
starts its second rank from inside Triton's stub, answers exactly as transformers does, and stops
it with the server.

A server of its own (its instance has two processes); the default model's 3 KV heads split 2 + 1.
"""

from __future__ import annotations

import pytest
import torch

from launcher import TritonServer
from launcher.ports import free_server_ports
from launcher.repository import Setting, render_repository
from launcher.server import DEFAULT_MODEL_REPOSITORY
from python_backend_utils.environment import default_model_dir
from tests.helpers import FP32_SETTINGS, PROMPTS, generate

pytestmark = pytest.mark.integration

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("parallel")
    repository = work / "model_repository"
    render_repository(DEFAULT_MODEL_REPOSITORY, repository,
                      settings=tuple(map(Setting.parse, ("aggregated.tensor_parallel_size=2", *FP32_SETTINGS))))
    triton = TritonServer(repository, **free_server_ports(), models=["ensemble_aggregated", "aggregated"],
                          log_file=work / "server.log")
    try:
        triton.start()
        yield triton
    finally:
        triton.stop()


def test_an_aggregated_instance_split_over_two_ranks_answers_as_transformers(server):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    reference = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    for prompt in PROMPTS[1:3]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = reference.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0, ids.shape[1]:]
        assert generate(server, "ensemble_aggregated", prompt, MAX_TOKENS) == tokenizer.decode(
            expected, skip_special_tokens=True), prompt
