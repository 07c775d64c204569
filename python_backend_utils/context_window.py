"""How long a context a checkpoint allows, from its config.json: one rule for the engine (its
max_model_len), the text limits checked before tokenizing, and the OpenAI frontend (what a request
without max_tokens may use). Standard library only: every layer reads it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

# The default window is capped here: the KV pool and the rotary tables are sized from it.
DEFAULT_WINDOW_CAP = 8192


def model_config(model_dir: Path) -> dict:
    """The text model's part of a checkpoint's config.json (multimodal ones nest it)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("text_config", config)


def supported_window(config: Mapping) -> int:
    """The longest context the model supports: its positions, or its sliding window where it uses one."""
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int) or positions <= 0:
        raise ValueError("the model's config names no max_position_embeddings")
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    return min(positions, window) if window else positions


def default_window(config: Mapping) -> int:
    """The window an engine gets when its max_model_len is not set."""
    return min(supported_window(config), DEFAULT_WINDOW_CAP)
