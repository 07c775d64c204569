"""Structured output: the tokens a grammar allows next, as a mask over a step's logits (xgrammar).

A request's guide (GuidedDecoding: a JSON schema, a regex, an EBNF grammar, or any JSON object) is
compiled once against the checkpoint's vocabulary and cached; each request then gets a matcher of
its own that advances with every token it accepts. Before sampling, the rows that have one get
their disallowed tokens set to -inf in one batched call; the request ends ("stop") once its
grammar is complete and the model chose the end token, the only token a complete grammar allows.

JSON is generated without free whitespace (", " and ": " separate items): a small model left free
whitespace can spend its whole answer on newlines.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from pathlib import Path

import torch
import xgrammar as xgr

from python_backend_utils.engine.sampling_params import GuidedDecoding
from python_backend_utils.errors import InvalidRequestError

# Compiled grammars kept (least recently used dropped first); one is a few hundred KB at most
# for the schemas of tool calls and structured answers.
CACHED_GRAMMARS = 128
# xgrammar prefixes its messages with a timestamp and its source file: the client needs neither.
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+: (Check failed: \(.*?\) is false: )?")


class GrammarViolationError(InvalidRequestError):
    """A token the request's grammar does not allow: every token was banned at once (the grammar
    and bad_words leave nothing to generate), or a first token that arrived from a context
    instance under another grammar."""


class Grammars:
    """Compiles guides for one checkpoint; thread-safe, so requests compile in the thread that
    submits them while the engine loop keeps stepping."""

    def __init__(self, model_dir: Path, vocab_size: int, stop_token_ids: list[int]) -> None:
        self._model_dir = model_dir
        self._vocab_size = vocab_size
        self._stop_token_ids = stop_token_ids
        self._compiler: xgr.GrammarCompiler | None = None
        self._compiled: collections.OrderedDict[GuidedDecoding, xgr.CompiledGrammar] = collections.OrderedDict()
        self._lock = threading.Lock()

    def compile(self, guide: GuidedDecoding) -> xgr.CompiledGrammar:
        """The guide's grammar, from the cache when it was compiled before; InvalidRequestError when it
        is not a valid schema, regex or grammar."""
        with self._lock:
            if (compiled := self._compiled.get(guide)) is not None:
                self._compiled.move_to_end(guide)
                return compiled
        compiler = self._get_compiler()
        try:
            if guide.guide_type == "json":
                compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            elif guide.guide_type == "json_schema":
                compiled = compiler.compile_json_schema(_json_text(guide.guide), any_whitespace=False)
            elif guide.guide_type == "regex":
                compiled = compiler.compile_regex(guide.guide)
            else:
                compiled = compiler.compile_grammar(guide.guide)
        except RuntimeError as error:
            message = _XGRAMMAR_PREFIX.sub("", str(error).strip())
            raise InvalidRequestError(f"guided_decoding_guide is not a valid {guide.guide_type}: {message}") from None
        with self._lock:
            self._compiled[guide] = compiled
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, guide: GuidedDecoding, end_id: int | None = None) -> GrammarMatcher:
        """A new matcher; `end_id`, the request's end token, is the one a complete grammar allows
        (the checkpoint's end tokens when None)."""
        stop = [end_id] if end_id is not None else None
        return GrammarMatcher(xgr.GrammarMatcher(self.compile(guide), override_stop_tokens=stop))

    def _get_compiler(self) -> xgr.GrammarCompiler:
        """Built on the first guided request: reading the vocabulary takes about a second, which
        instances that never see one should not pay at start."""
        with self._lock:
            if self._compiler is None:
                from transformers import AutoTokenizer

                try:
                    tokenizer = AutoTokenizer.from_pretrained(self._model_dir)
                except (OSError, ValueError) as error:
                    raise InvalidRequestError(
                        f"guided decoding needs the checkpoint's tokenizer, and {self._model_dir} has none "
                        f"that loads ({error})") from None
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self._vocab_size,
                                                          stop_token_ids=self._stop_token_ids or None)
                # Cached here (self._compiled), where entries are bounded by count.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler


def _json_text(schema: str) -> str:
    try:
        json.loads(schema)
    except json.JSONDecodeError as error:
        raise InvalidRequestError(f"guided_decoding_guide is not JSON: {error}") from None
    return schema


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self._matcher = matcher

    def advance(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise GrammarViolationError(
                f"token {token} is not allowed by the request's grammar at this point (do its bad_words "
                "ban every token the grammar allows?)")

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its end token was accepted: nothing may follow."""
        return self._matcher.is_terminated()

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)


def apply_grammar_masks(logits: torch.Tensor, matchers: list[GrammarMatcher | None]) -> None:
    """Set to -inf, in place, the logits of every token a row's grammar forbids (rows without one
    are left alone): one bitmask for the batch, one masking call."""
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for row in rows:
        matchers[row].fill_mask(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=logits.shape[1], indices=rows)
