"""The tokenizer of the checkpoint the engine serves, for pre- and postprocessing."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from python_backend_utils.config import EngineConfig
from python_backend_utils.default_model import resolve_model_dir


def load_tokenizer(parameters: dict[str, str]) -> PreTrainedTokenizerBase:
    """Resolve the checkpoint exactly as the engine does (config.pbtxt `model_dir`, environment, default)."""
    model_dir = EngineConfig.from_parameters({"model_dir": parameters.get("model_dir", "")}).model_dir
    return AutoTokenizer.from_pretrained(resolve_model_dir(model_dir))
