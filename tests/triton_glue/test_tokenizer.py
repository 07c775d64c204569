"""The light tokenizer of pre- and postprocessing equals transformers' on the default checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from python_backend_utils.environment import CheckpointNotFoundError, resolve_model_dir
from python_backend_utils.triton_glue.tokenizer import FastTokenizer, load_tokenizer

TEXTS = [
    "The capital of France is",
    "  leading spaces, émojis 🎉 and <|im_start|>user\nspecial tokens<|im_end|>",
    "",
    "日本語のテキスト",
    "tabs\tand\n\nnewlines  ",
]


@pytest.fixture(scope="module")
def model_dir():
    try:
        return resolve_model_dir()
    except CheckpointNotFoundError as error:
        pytest.skip(str(error))


def test_encode_and_decode_equal_transformers(model_dir):
    from transformers import AutoTokenizer

    reference, light = AutoTokenizer.from_pretrained(model_dir), load_tokenizer({"model_dir": str(model_dir)})
    assert isinstance(light, FastTokenizer)
    assert (light.eos_token_id, light.pad_token_id) == (reference.eos_token_id, reference.pad_token_id)
    for text in TEXTS:
        ids = reference(text)["input_ids"]
        assert light.encode(text) == ids
        assert light.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert light.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def test_a_config_that_adds_bos_itself_goes_through_transformers(model_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    (tmp_path / "config.json").write_text("{}")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    assert not isinstance(load_tokenizer({"model_dir": str(tmp_path)}), FastTokenizer)


def test_loading_the_tokenizer_does_not_load_torch(model_dir):
    code = ("import sys; from python_backend_utils.triton_glue.tokenizer import load_tokenizer; "
            f"load_tokenizer({{'model_dir': {str(model_dir)!r}}}).encode('hi'); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
