"""The checkpoint the server runs, as the frontend needs it: its card, tokenizer, chat template and window."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from openai_frontend.chat_template import ChatTemplate
from openai_frontend.schemas import ModelCard
from python_backend_utils.context_window import default_window, model_config
from python_backend_utils.triton_glue.tokenizer import TextTokenizer, load_tokenizer

OWNER = "triton-disagg"


@dataclass
class ServedModel:
    """The checkpoint the server runs, as the frontend needs it."""

    card: ModelCard
    tokenizer: TextTokenizer
    chat_template: ChatTemplate | None
    context_window: int

    @classmethod
    def load(cls, model_dir: Path, served_name: str | None = None) -> ServedModel:
        """`served_name`: the `model` clients name (default: the checkpoint directory's name)."""
        card = ModelCard(id=served_name or model_dir.name, created=int((model_dir / "config.json").stat().st_mtime),
                         owned_by=OWNER)
        return cls(card, load_tokenizer({"model_dir": str(model_dir)}), ChatTemplate.from_checkpoint(model_dir),
                   default_window(model_config(model_dir)))
