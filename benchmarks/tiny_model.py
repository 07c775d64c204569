"""Write a 2-layer, random-weight Llama with the default model's tokenizer, for measuring hops.

With the default model a decode step takes ~95 ms here, and its run-to-run variation hides what a
few ms of orchestration cost. With this one a step takes a few ms, so the cost of the ensemble
and BLS hops is what remains between the paths of `benchmarks.orchestration_overhead`. Its
end-of-sequence logits are fixed at zero (random hidden states always give some other token a
higher one), so greedy requests always run to `max_tokens` and every path streams as many
tokens.

    .venv/bin/python -m benchmarks.tiny_model /tmp/tiny-llama
    .venv/bin/disagg-serve --mode both --model-dir /tmp/tiny-llama
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from python_backend_utils.engine.checkpoint import prepare_default_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def write_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = prepare_default_model()
    config = AutoConfig.from_pretrained(source)
    config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, tie_word_embeddings=False))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    eos_ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    with torch.no_grad():
        model.lm_head.weight[eos_ids] = 0.0
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out_dir / name)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_model(args.out_dir, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
