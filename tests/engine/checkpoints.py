"""Building blocks for engine tests: tiny seeded checkpoints and a driver that runs an engine dry."""

from __future__ import annotations

from pathlib import Path

import torch

from python_backend_utils.engine.engine import LLMEngine, RequestOutput

TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def build_tiny_checkpoint(family: str, directory: Path, seed: int = 0) -> Path:
    """A random-weight model of `family`, small enough that a test runs in milliseconds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=family == "llama",
        eos_token_id=1,
        bos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    return directory


def reference_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' own greedy generation, the ground truth for token-for-token checks."""
    output = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
    )
    return output[0][len(prompt):].tolist()


def run_to_completion(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    raise AssertionError(f"engine still busy after {max_steps} steps: {engine.stats()}")


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [token for output in outputs for token in output.token_ids]
