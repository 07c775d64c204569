"""Size limits on what one request may send, checked before its tensors become Python lists or
its text is tokenized: a request that could never be served must not cost a stub its memory.

Triton 2.51 takes gRPC messages up to 2 GB and has no flag to lower that, so these checks are
the bound. Each refusal is an InvalidRequestError naming the input, the size and the limit.
"""

from __future__ import annotations

from python_backend_utils.errors import InvalidRequestError

# Token ids in one prompt: above the window of any model served here (the engine then checks the
# real one), while a list this long still costs only ~40 MB of Python ints.
MAX_PROMPT_IDS = 1 << 20
# Stop and bad words are matched on every generated token: each list (stop_words, bad_words) may
# hold this many words, of this many token ids together, from this much text.
MAX_WORDS = 256
MAX_WORD_LIST_IDS = 4096
MAX_WORD_LIST_BYTES = 64 << 10


def check_size(name: str, count: int, limit: int, unit: str) -> None:
    if count > limit:
        raise InvalidRequestError(f"{name} holds {count} {unit}, more than the {limit} allowed")


def check_words(words: list[bytes], name: str) -> None:
    """stop_words / bad_words as sent, before they are decoded and tokenized."""
    check_size(name, len(words), MAX_WORDS, "words")
    check_size(name, sum(len(word) for word in words), MAX_WORD_LIST_BYTES, "bytes")


class PromptTextLimit:
    """The most UTF-8 bytes of text that can fit in the context window: the window times the
    longest token's text (81 bytes for SmolLM2's vocabulary, so 663,552 bytes for its 8192 tokens).
    A longer text can never be served, so it is refused without tokenizing it (4 MB took 8 s)."""

    def __init__(self, window: int, longest_token_bytes: int) -> None:
        self.window = window
        self.longest_token_bytes = longest_token_bytes
        self.max_bytes = window * longest_token_bytes

    def check(self, text: bytes, name: str = "text_input") -> None:
        if len(text) > self.max_bytes:
            raise InvalidRequestError(
                f"{name} has {len(text)} bytes, more than fit in the model's context window of {self.window} tokens "
                f"(at most {self.max_bytes} bytes, {self.longest_token_bytes} a token): shorten it")
