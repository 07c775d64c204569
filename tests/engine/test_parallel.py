"""Tensor- and pipeline-parallel engines against transformers, token for token, and the rank group's life cycle."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import time

import pytest
import torch

from python_backend_utils.engine.config import ConfigError, EngineConfig
from python_backend_utils.engine.engine import LLMEngine
from python_backend_utils.engine.loop import EngineLoop
from python_backend_utils.engine.parallel import RankGroupError
from python_backend_utils.engine.sampling_params import SamplingParams
from python_backend_utils.engine.sharding import model_shards, split_cores
from python_backend_utils.environment import default_model_dir
from python_backend_utils.errors import EngineDeadError
from tests.engine.checkpoints import (
    TINY_FAMILIES,
    build_tiny_checkpoint,
    reference_greedy,
    run_to_completion,
    tokens_of,
)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there lived a"]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def test_the_default_models_three_kv_heads_split_two_and_one_over_two_ranks_each_with_its_query_group():
    first, second = model_shards(30, num_heads=9, num_kv_heads=3, intermediate_size=1536, tensor_parallel_size=2)
    assert (first.kv_heads, first.heads, first.intermediate, first.layers) == ((0, 2), (0, 6), (0, 768), (0, 30))
    assert (second.kv_heads, second.heads, second.intermediate) == ((2, 3), (6, 9), (768, 1536))
    assert [s.kv_heads for s in model_shards(30, 9, 3, 1536, tensor_parallel_size=3)] == [(0, 1), (1, 2), (2, 3)]


def test_pipeline_stages_hold_runs_of_whole_layers():
    stages = model_shards(30, 9, 3, 1536, pipeline_parallel_size=4)
    assert [s.layers for s in stages] == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert all(s.heads == (0, 9) and s.kv_heads == (0, 3) and not s.splits_heads for s in stages)


def test_a_split_the_model_cannot_take_is_a_clear_error():
    with pytest.raises(ConfigError, match="tensor_parallel_size=4 exceeds the model's 3 KV heads"):
        model_shards(30, 9, 3, 1536, tensor_parallel_size=4)
    with pytest.raises(ConfigError, match="pipeline_parallel_size=3 exceeds the model's 2 layers"):
        model_shards(2, 4, 2, 128, pipeline_parallel_size=3)
    with pytest.raises(ConfigError, match="cannot both exceed 1"):
        model_shards(30, 9, 3, 1536, tensor_parallel_size=2, pipeline_parallel_size=2)
    with pytest.raises(ConfigError, match="tensor_parallel_size=0"):
        EngineConfig(tensor_parallel_size=0)


def test_an_instances_cores_are_dealt_out_to_its_ranks():
    assert split_cores(frozenset({4, 5, 6, 7}), 2) == [frozenset({4, 5}), frozenset({6, 7})]
    assert split_cores(frozenset({0, 1, 2}), 2) == [frozenset({0, 1}), frozenset({2})]
    assert split_cores(frozenset({0}), 2) == [None, None]
    assert split_cores(None, 3) == [None, None, None]


@pytest.fixture(scope="module")
def smol_reference() -> list[tuple[list[int], list[int]]]:
    """(prompt ids, transformers' 8 greedy tokens) for each of PROMPTS, computed once for the module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = str(default_model_dir())
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    prompts = [AutoTokenizer.from_pretrained(directory)(p).input_ids for p in PROMPTS]
    return [(prompt, reference_greedy(model, prompt, 8)) for prompt in prompts]


@pytest.mark.parametrize("split", [{"tensor_parallel_size": 2}, {"tensor_parallel_size": 3},
                                   {"pipeline_parallel_size": 2}], ids=["tp2", "tp3", "pp2"])
def test_default_model_split_over_ranks_matches_transformers(split, smol_reference):
    """TP2 splits the 3 KV heads unevenly (2 + 1), TP3 evenly, PP2 the 30 layers 15 + 15; requests join a
    running batch mid-decode."""
    prompts = [prompt for prompt, _ in smol_reference]
    engine = LLMEngine(EngineConfig(dtype="float32", model_dir=str(default_model_dir()), num_kv_blocks=64, block_size=16, **split))
    try:
        local = engine.model.shard
        assert engine.pool.tensor.shape[1] == local.layers[1] - local.layers[0]  # the leader's pool: its layers
        assert engine.pool.tensor.shape[4] == local.kv_heads[1] - local.kv_heads[0]  # and its heads only
        outputs: dict[str, list] = {}
        engine.add_request("r0", prompts[0], greedy(8))
        for step in range(3):
            if step == 2:
                engine.add_request("r1", prompts[1], greedy(8))
                engine.add_request("r2", prompts[2], greedy(8))
            for output in engine.step():
                outputs.setdefault(output.request_id, []).append(output)
        for request_id, more in run_to_completion(engine).items():
            outputs.setdefault(request_id, []).extend(more)
        for index, (_, expected) in enumerate(smol_reference):
            assert tokens_of(outputs[f"r{index}"]) == expected, PROMPTS[index]
        if "tensor_parallel_size" in split:  # the all-reduces went through shared memory
            assert engine.model.all_reduce.shared.calls >= 2 * 30 * 10
    finally:
        engine.close()


@pytest.mark.parametrize("split", ["tensor_parallel_size", "pipeline_parallel_size"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_each_supported_family_split_over_two_ranks_matches_transformers(family, split, tmp_path):
    """Tokens and the prefill's logits: a random tiny model's greedy tokens alone barely depend on its layers."""
    from transformers import AutoModelForCausalLM

    directory = build_tiny_checkpoint(family, tmp_path / family)
    engine = LLMEngine(EngineConfig(dtype="float32", model_dir=str(directory), num_kv_blocks=64, block_size=4, **{split: 2}))
    try:
        reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        prompts = [[5, 6, 7, 8, 9, 10, 11], [42] * 3, list(range(100, 130))]
        forward, first_logits = engine.model.forward, []
        engine.model.forward = lambda chunks, pool: first_logits.append(forward(chunks, pool)) or first_logits[-1]
        for index, prompt in enumerate(prompts):
            engine.add_request(str(index), prompt, greedy(10))
        outputs = run_to_completion(engine)
        with torch.no_grad():
            expected = torch.stack([reference(torch.tensor([p])).logits[0, -1] for p in prompts])
        torch.testing.assert_close(first_logits[0], expected, atol=1e-4, rtol=1e-4)
        for index, prompt in enumerate(prompts):
            assert tokens_of(outputs[str(index)]) == reference_greedy(reference, prompt, 10)
    finally:
        engine.close()


@pytest.fixture
def tiny_dir(tmp_path):
    return str(build_tiny_checkpoint("llama", tmp_path / "llama"))


def test_a_dead_rank_fails_its_groups_requests_and_ends_the_loop_so_that_the_instance_is_reloaded(tiny_dir):
    """The loop's death is what makes the serving layer exit the stub, and Triton load the instance again."""
    engine = LLMEngine(EngineConfig(dtype="float32", model_dir=tiny_dir, num_kv_blocks=64, block_size=4, tensor_parallel_size=2))
    deaths: queue.Queue = queue.Queue()
    loop = EngineLoop(engine, on_death=deaths.put)
    try:
        loop.start()
        outputs: queue.Queue = queue.Queue()
        errors: queue.Queue = queue.Queue()
        loop.submit("before", [5, 6, 7], greedy(4), outputs.put, on_error=errors.put)
        assert outputs.get(timeout=60).token_ids  # the group serves
        while not outputs.get(timeout=60).finished:  # and is idle when its rank dies: "after" meets the dead rank
            pass
        (process,) = engine.model.ranks._processes
        process.kill()
        process.wait()
        loop.submit("after", [5, 6, 7], greedy(4), outputs.put, on_error=errors.put)
        death = deaths.get(timeout=60)
        assert isinstance(death, RankGroupError) and "reload the model instance" in str(death)
        error = errors.get(timeout=30)
        assert isinstance(error, EngineDeadError) and "RankGroupError" in str(error)
    finally:
        loop.stop()
        engine.close()


def test_ranks_stop_with_the_engine_and_die_with_their_leader(tiny_dir, tmp_path):
    engine = LLMEngine(EngineConfig(dtype="float32", model_dir=tiny_dir, num_kv_blocks=64, block_size=4, tensor_parallel_size=2))
    (process,) = engine.model.ranks._processes
    engine.close()
    assert process.returncode == 0  # asked to stop, it stopped (not killed)

    leader = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from python_backend_utils.engine.config import EngineConfig\n"
        "from python_backend_utils.engine.engine import LLMEngine\n"
        f"engine = LLMEngine(EngineConfig(dtype='float32', model_dir={tiny_dir!r}, num_kv_blocks=8, block_size=4, "
        "tensor_parallel_size=2))\n"
        "print(engine.model.ranks._processes[0].pid, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        rank_pid = int(leader.stdout.readline())
        leader.send_signal(signal.SIGKILL)
        leader.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(rank_pid):
            time.sleep(0.1)
        assert not _alive(rank_pid), "a rank outlived its leader"
    finally:
        leader.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
