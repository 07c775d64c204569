"""One rule for a checkpoint's context window, shared by the engine, the text limits and the OpenAI frontend."""

from __future__ import annotations

import pytest

from python_backend_utils.context_window import DEFAULT_WINDOW_CAP, default_window, supported_window


@pytest.mark.parametrize(("config", "supported", "default"), [
    ({"max_position_embeddings": 2048}, 2048, 2048),
    ({"max_position_embeddings": 32768}, 32768, DEFAULT_WINDOW_CAP),
    ({"max_position_embeddings": 32768, "sliding_window": 4096}, 4096, 4096),  # Mistral
    ({"max_position_embeddings": 32768, "sliding_window": 4096, "use_sliding_window": False}, 32768,
     DEFAULT_WINDOW_CAP),  # Qwen2 names a window it does not use
    ({"max_position_embeddings": 4096, "sliding_window": None}, 4096, 4096),
])
def test_the_window_is_the_positions_or_the_sliding_window_and_the_default_is_capped(config, supported, default):
    assert (supported_window(config), default_window(config)) == (supported, default)


def test_a_config_without_positions_is_refused():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        supported_window({"hidden_size": 64})


def test_the_engine_takes_its_window_from_the_same_rule(tmp_path):
    from python_backend_utils.engine.config import EngineConfig
    from python_backend_utils.engine.engine import LLMEngine
    from tests.engine.checkpoints import build_tiny_checkpoint

    engine = LLMEngine(EngineConfig(model_dir=str(build_tiny_checkpoint("mistral", tmp_path)), dtype="float32",
                                    kv_cache_memory_bytes=1 << 20))
    assert engine.max_model_len == default_window({"max_position_embeddings": 1024, "sliding_window": 4096})
