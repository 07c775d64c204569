"""What the int8-weight mode costs in accuracy: perplexity on a fixed text, and greedy agreement.

    python -m benchmarks.int8_accuracy [--model-dir DIR] [--prompts 50] [--tokens 16] [--json out.json]

The mode is weight-only (activations stay fp32), so its perplexity is exactly that of the
checkpoint with each linear weight replaced by its per-channel int8 round trip; that is what is
measured, with transformers, on the first 1024 tokens of the benchmark corpus. Agreement runs the
engine itself in both modes: the share of prompts whose greedy continuation is identical, and the
share of tokens equal before the first difference.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from client.datasets import corpus_text
from python_backend_utils.engine.config import EngineConfig
from python_backend_utils.engine.engine import LLMEngine
from python_backend_utils.engine.linear import Int8Linear
from python_backend_utils.engine.sampling_params import SamplingParams
from python_backend_utils.environment import resolve_model_dir

PERPLEXITY_TOKENS = 1024


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        loss = model(ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss
    return math.exp(loss.item())


def int8_round_trip(model) -> None:
    """Every linear weight of the body and the LM head becomes what the int8 mode computes with."""
    with torch.inference_mode():
        for module in [*model.model.layers.modules(), model.lm_head]:
            if isinstance(module, torch.nn.Linear):
                quantized = Int8Linear(module.weight)
                module.weight = torch.nn.Parameter(quantized.dequantized())


def greedy_outputs(engine: LLMEngine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, SamplingParams(max_tokens=tokens, ignore_eos=True))
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).extend(output.token_ids)
    return [outputs[str(index)] for index in range(len(prompts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = str(resolve_model_dir(args.model_dir or None))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text_ids = tokenizer(corpus_text())["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor(text_ids[:PERPLEXITY_TOKENS])
    fp32_ppl = perplexity(model, ids)
    int8_round_trip(model)
    int8_ppl = perplexity(model, ids)
    del model

    starts = range(PERPLEXITY_TOKENS, PERPLEXITY_TOKENS + 97 * args.prompts, 97)
    prompts = [text_ids[s : s + 32] for s in starts]
    config = dict(model_dir=model_dir, max_num_seqs=args.prompts, num_kv_blocks=64 * args.prompts // 16 + 16)
    reference = greedy_outputs(LLMEngine(EngineConfig(**config)), prompts, args.tokens)
    quantized = greedy_outputs(LLMEngine(EngineConfig(**config, weight_quantization="int8")), prompts, args.tokens)
    identical = sum(a == b for a, b in zip(reference, quantized))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                 for a, b in zip(reference, quantized))
    result = {
        "perplexity_fp32": fp32_ppl, "perplexity_int8": int8_ppl, "perplexity_change": int8_ppl / fp32_ppl - 1,
        "prompts": len(prompts), "tokens": args.tokens, "identical_continuations": identical / len(prompts),
        "tokens_equal_before_first_difference": prefix / (len(prompts) * args.tokens),
    }
    print(f"perplexity on {PERPLEXITY_TOKENS} tokens: fp32 {fp32_ppl:.3f}, int8 {int8_ppl:.3f} "
          f"({result['perplexity_change']:+.1%})")
    print(f"greedy, {len(prompts)} prompts x {args.tokens} tokens: {identical} identical continuations "
          f"({result['identical_continuations']:.0%}), {result['tokens_equal_before_first_difference']:.0%} of "
          "tokens equal before the first difference")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
