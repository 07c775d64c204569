"""Streamed token ids to answer text, cut before the first stop string.

Detokenized incrementally as postprocessing does (python_backend_utils.triton_glue.detokenize), so the
text equals the ensemble's for the same tokens. Text that could be the start of a stop string is
held back until the next tokens show whether it is.
"""

from __future__ import annotations

from python_backend_utils.triton_glue.detokenize import PRECEDING_TOKENS, decode_increment
from python_backend_utils.triton_glue.tokenizer import TextTokenizer


def _partial_stop_length(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that begin some stop string."""
    return max((k for stop in stops for k in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:k])), default=0)


class AnswerText:
    def __init__(self, tokenizer: TextTokenizer, prompt_ids: list[int], stops: list[str],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._history = list(prompt_ids[-PRECEDING_TOKENS:])
        self._stops = stops
        self.text = ""
        self._sent = 0  # characters of text handed out so far
        self.token_count = 0
        self.stopped = False  # a stop string was found: the answer ends here

    def add(self, token_ids: list[int]) -> str:
        """The text these tokens make ready to send (possibly empty)."""
        self.token_count += len(token_ids)
        searched_from = max(0, len(self.text) - max((len(stop) for stop in self._stops), default=0))
        self.text += decode_increment(self._tokenizer, self._history, token_ids, self._skip_special_tokens)
        self._history = (self._history + token_ids)[-PRECEDING_TOKENS:]
        found = [at for stop in self._stops if (at := self.text.find(stop, searched_from)) >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True
            return self._take(len(self.text))
        return self._take(len(self.text) - _partial_stop_length(self.text, self._stops))

    def finish(self) -> str:
        """What was held back, once no token follows."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return piece

    def token_text(self, token_id: int) -> str:
        """One token's own text, for log-probability entries."""
        return self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
