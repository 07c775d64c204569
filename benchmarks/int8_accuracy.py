"""What each dtype costs in accuracy: perplexity on a fixed text, and greedy agreement with transformers.

    python -m benchmarks.int8_accuracy [--model-dir DIR] [--prompts 50] [--tokens 16] [--json out.json]

For fp32, bf16 and int8 weights (with fp32 and with bf16 activations), the engine itself, as it
serves: its perplexity on the first 1024 tokens of the benchmark corpus (prefilled in one chunk),
and its greedy continuations (its decode path, over its KV cache in the same dtype) of
--prompts prompts (32 tokens each, cut from the corpus after that text) against transformers' in
the same dtype: the share of identical continuations, and the share of tokens equal before the
first difference. int8 has no transformers counterpart; it is held against transformers in its
activation dtype, the model it approximates. transformers' own perplexity in fp32 and bf16 is
printed beside the engine's as a check.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from unittest import mock

import torch

from client.datasets import corpus_text
from python_backend_utils.engine.config import DTYPES, EngineConfig
from python_backend_utils.engine.engine import LLMEngine
from python_backend_utils.engine.paged_causal_lm import Chunk
from python_backend_utils.engine.sampling_params import SamplingParams
from python_backend_utils.environment import resolve_model_dir

PERPLEXITY_TOKENS = 1024
PROMPT_TOKENS = 32
PROMPT_STRIDE = 97


@dataclass(frozen=True)
class Mode:
    name: str
    dtype: str
    weight_quantization: str = ""


MODES = (Mode("fp32", "float32"), Mode("bf16", "bfloat16"), Mode("int8 (fp32 activations)", "float32", "int8"),
         Mode("int8 (bf16 activations)", "bfloat16", "int8"))


@dataclass(frozen=True)
class Row:
    mode: str
    perplexity: float
    transformers_perplexity: float | None
    identical_continuations: float
    tokens_equal_before_first_difference: float


def engine_perplexity(engine: LLMEngine, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ids[1:], each token predicted from those before it: the
    text prefilled in one chunk by the engine's layers, every position's logits taken from its final
    norm and LM head (a step samples only the last position's)."""
    model = engine.model

    def every_position(hidden: torch.Tensor, plan) -> torch.Tensor:
        return model.lm_head(model._norm(hidden, model.final_norm))

    table = list(range(engine.block_manager.blocks_for(len(ids))))
    with torch.inference_mode(), mock.patch.object(model, "_logits", every_position):
        logits = model.forward([Chunk(ids, 0, table, True)], engine.pool)
    loss = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))
    return math.exp(loss.item())


def transformers_perplexity(model, ids: list[int]) -> float:
    tensor = torch.tensor([ids])
    with torch.inference_mode():
        return math.exp(model(tensor, labels=tensor).loss.item())


def engine_greedy(engine: LLMEngine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, SamplingParams(max_tokens=tokens, ignore_eos=True))
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).extend(output.token_ids)
    return [outputs[str(index)] for index in range(len(prompts))]


def transformers_greedy(model, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """One batch: the prompts are all PROMPT_TOKENS long, so nothing is padded."""
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                min_new_tokens=tokens, do_sample=False)
    return output[:, len(prompts[0]):].tolist()


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[float, float]:
    """(share of identical continuations, share of tokens equal before the first difference)."""
    identical = sum(a == b for a, b in zip(ours, theirs))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(ours, theirs))
    return identical / len(ours), prefix / sum(len(a) for a in ours)


def measure(model_dir: str, num_prompts: int, tokens: int) -> list[Row]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text_ids = AutoTokenizer.from_pretrained(model_dir)(corpus_text())["input_ids"]
    window = text_ids[:PERPLEXITY_TOKENS]
    starts = range(PERPLEXITY_TOKENS, PERPLEXITY_TOKENS + PROMPT_STRIDE * num_prompts, PROMPT_STRIDE)
    prompts = [text_ids[s:s + PROMPT_TOKENS] for s in starts]
    references: dict[str, tuple[float, list[list[int]]]] = {}
    rows = []
    for mode in MODES:
        if mode.dtype not in references:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[mode.dtype])
            references[mode.dtype] = (transformers_perplexity(model, window),
                                      transformers_greedy(model, prompts, tokens))
            del model
        reference_perplexity, reference_tokens = references[mode.dtype]
        blocks = (PERPLEXITY_TOKENS + (PROMPT_TOKENS + tokens) * num_prompts) // 16 + 16
        engine = LLMEngine(EngineConfig(model_dir=model_dir, dtype=mode.dtype, max_num_seqs=num_prompts,
                                        weight_quantization=mode.weight_quantization, num_kv_blocks=blocks))
        perplexity = engine_perplexity(engine, window)
        identical, prefix = agreement(engine_greedy(engine, prompts, tokens), reference_tokens)
        rows.append(Row(mode.name, perplexity, None if mode.weight_quantization else reference_perplexity,
                        identical, prefix))
        print(f"{mode.name}: perplexity {perplexity:.3f}, {identical:.0%} identical", flush=True)
    return rows


def print_table(rows: list[Row], num_prompts: int, tokens: int) -> None:
    fp32 = rows[0].perplexity
    print(f"\nperplexity on {PERPLEXITY_TOKENS} corpus tokens; greedy agreement with transformers in the same dtype, "
          f"{num_prompts} prompts x {tokens} tokens\n")
    print("| mode | perplexity (engine) | vs fp32 | perplexity (transformers) | identical continuations "
          "| tokens equal before the first difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        theirs = f"{row.transformers_perplexity:.3f}" if row.transformers_perplexity is not None else "-"
        print(f"| {row.mode} | {row.perplexity:.3f} | {row.perplexity / fp32 - 1:+.2%} | {theirs} "
              f"| {row.identical_continuations:.0%} | {row.tokens_equal_before_first_difference:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()
    model_dir = str(resolve_model_dir(args.model_dir or None))
    rows = measure(model_dir, args.prompts, args.tokens)
    print_table(rows, args.prompts, args.tokens)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"prompts": args.prompts, "tokens": args.tokens, "perplexity_tokens": PERPLEXITY_TOKENS,
                       "rows": [asdict(row) for row in rows]}, handle, indent=2)


if __name__ == "__main__":
    main()
