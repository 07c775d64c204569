"""Stateless incremental detokenization of streamed tokens.

Each response of the middle step carries its new tokens and up to PRECEDING_TOKENS tokens
right before them. Decoding the new tokens alone would lose text that depends on context
(SentencePiece drops a word's leading space at the start of a decode) and would break a
multi-byte character split across tokens. Instead: the text of preceding+new minus the text of
preceding, where a trailing incomplete UTF-8 character (which decodes to U+FFFD) is held back
from both, so a character appears exactly once, in the response whose tokens complete it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# A UTF-8 character spans at most 4 byte tokens; 8 also covers SentencePiece's space handling.
PRECEDING_TOKENS = 8
_REPLACEMENT_CHARACTER = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool, clean_up_tokenization_spaces: bool) -> str: ...


def complete_text(tokenizer: Decoder, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """The text of `token_ids` without a trailing incomplete character.

    Tokenization-space clean-up stays off: it rewrites text across token boundaries, so the
    text of a prefix would no longer be a prefix of the text.
    """
    text = tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens,
                            clean_up_tokenization_spaces=False)
    return text.rstrip(_REPLACEMENT_CHARACTER)


def decode_increment(tokenizer: Decoder, preceding: Sequence[int], new: Sequence[int],
                     skip_special_tokens: bool = True) -> str:
    """The text that `new` adds after `preceding` (special tokens' text left out unless told)."""
    before = complete_text(tokenizer, preceding, skip_special_tokens)
    return complete_text(tokenizer, [*preceding, *new], skip_special_tokens)[len(before):]
