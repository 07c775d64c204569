"""The tokenizer of the checkpoint the engine serves, for pre- and postprocessing.

A checkpoint with a `tokenizer.json` (every fast tokenizer) is read with the `tokenizers` library
alone: transformers would load torch into the pre- and postprocessing processes (about 300 MB
each) for what is a Rust tokenizer underneath. Its special tokens come from
`tokenizer_config.json` as transformers reads them. A checkpoint without one (a slow,
SentencePiece-only tokenizer), or whose config asks transformers to add BOS/EOS tokens itself
(`add_bos_token`, `add_eos_token`: transformers then rewrites the post-processor), goes through
transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer

from python_backend_utils.environment import resolve_model_dir


class TextTokenizer(Protocol):
    eos_token_id: int | None
    pad_token_id: int | None

    def __len__(self) -> int: ...  # the vocabulary, added tokens included
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, token_ids: list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str: ...


class FastTokenizer:
    """A checkpoint's tokenizer.json with the special tokens its tokenizer_config.json names."""

    def __init__(self, model_dir: Path) -> None:
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config_file = model_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.eos_token_id = self._special_id(config.get("eos_token"))
        self.pad_token_id = self._special_id(config.get("pad_token"))

    def _special_id(self, token: str | dict | None) -> int | None:
        if isinstance(token, dict):  # older configs write AddedToken objects
            token = token.get("content")
        return self._tokenizer.token_to_id(token) if token else None

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:
        if clean_up_tokenization_spaces:
            raise ValueError("tokenization-space clean-up is not supported: it rewrites text across token boundaries")
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def _adds_special_tokens_itself(model_dir: Path) -> bool:
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return "add_bos_token" in config or "add_eos_token" in config


def load_tokenizer(parameters: dict[str, str]) -> TextTokenizer:
    """Resolve the checkpoint exactly as the engine does (config.pbtxt `model_dir`, environment, default)."""
    model_dir = resolve_model_dir(parameters.get("model_dir") or None)
    if (model_dir / "tokenizer.json").is_file() and not _adds_special_tokens_itself(model_dir):
        return FastTokenizer(model_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def longest_token_bytes(tokenizer: TextTokenizer) -> int:
    """The most UTF-8 bytes of text one token stands for (decoding each id once: ~0.1 s)."""
    return max(len(tokenizer.decode([token_id]).encode()) for token_id in range(len(tokenizer)))
