"""Benchmark prompts cut from real text that ships with CPython, each to an exact token count.

No machine here reaches a dataset hub. CPython's pydoc topics (the language reference, about
110k tokens) and stdlib docstrings are real prose and code, so prefill sees real token
statistics; prompts start at random offsets, so they differ and never share a cached prefix
by accident. A prompt's input length (ISL) is counted exactly as the server's preprocessing
counts it: the tokenizer's default call, special tokens included.
"""

from __future__ import annotations

import importlib
import inspect
import pydoc_data.topics
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# Stdlib modules whose docstrings join the corpus: documented at length, importable everywhere.
DOCSTRING_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "email.message", "enum", "fractions", "functools", "http.client", "inspect",
    "ipaddress", "itertools", "json", "logging", "os", "pathlib", "pickle", "re", "shutil",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "unittest", "urllib.parse", "zipfile",
)  # fmt: skip
DEFAULT_MIX = "0.2:1024:32,0.8:64:64"  # long prompts with short answers among short chat turns
_MAX_CUT_ADJUSTMENTS = 8
_MAX_CUT_ATTEMPTS = 32


class Tokenizer(Protocol):
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict: ...
    def decode(self, token_ids: list[int], skip_special_tokens: bool, clean_up_tokenization_spaces: bool) -> str: ...


def corpus_text() -> str:
    """The pydoc topics, then the docstrings of DOCSTRING_MODULES and their public classes and functions."""
    parts = [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)]
    for module_name in DOCSTRING_MODULES:
        module = importlib.import_module(module_name)
        parts.append(inspect.getdoc(module) or "")
        for name, member in sorted(vars(module).items()):
            if name.startswith("_") or getattr(member, "__module__", None) != module_name:
                continue
            if inspect.isclass(member) or inspect.isfunction(member):
                parts.append(inspect.getdoc(member) or "")
    return "\n\n".join(part for part in parts if part)


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Tokens the server's preprocessing makes of `text` (its default call, special tokens included)."""
    return len(tokenizer(text)["input_ids"])


class PromptCutter:
    """Cuts prompts of an exact token count out of a tokenized corpus."""

    def __init__(self, tokenizer: Tokenizer, text: str) -> None:
        self.tokenizer = tokenizer
        self.corpus_ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]

    def cut(self, start: int, length: int) -> str | None:
        """Text from corpus token `start` that tokenizes to exactly `length` tokens, or None.

        Decoding a slice and encoding it again can merge or split tokens at the edges, so the
        slice grows or shrinks by the difference until the count is exact.
        """
        take = length
        for _ in range(_MAX_CUT_ADJUSTMENTS):
            if take <= 0 or start + take > len(self.corpus_ids):
                return None
            text = self.tokenizer.decode(
                self.corpus_ids[start : start + take], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            got = count_tokens(self.tokenizer, text)
            if got == length:
                return text
            take += length - got
        return None

    def random_prompt(self, rng: random.Random, length: int) -> str:
        """A prompt of exactly `length` tokens from a random place in the corpus."""
        last_start = len(self.corpus_ids) - 2 * length
        if last_start < 0:
            raise ValueError(f"the corpus ({len(self.corpus_ids)} tokens) is too short for a {length}-token prompt")
        for _ in range(_MAX_CUT_ATTEMPTS):
            text = self.cut(rng.randint(0, last_start), length)
            if text is not None:
                return text
        raise ValueError(f"could not cut a prompt of exactly {length} tokens from the corpus")


@dataclass(frozen=True)
class LengthDistribution:
    """A token count per request: `N` (fixed), `uniform:LOW:HIGH` or `normal:MEAN:STDDEV` (rounded, at least 1)."""

    kind: str
    first: float
    second: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> LengthDistribution:
        parts = spec.split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", int(parts[0]))
            if len(parts) == 3 and parts[0] in ("uniform", "normal"):
                kind, first, second = parts[0], float(parts[1]), float(parts[2])
                if kind == "uniform" and not 1 <= first <= second:
                    raise ValueError
                if kind == "normal" and (first < 1 or second < 0):
                    raise ValueError
                return cls(kind, first, second)
        except ValueError:
            pass
        raise ValueError(f"bad length {spec!r}: want N, uniform:LOW:HIGH or normal:MEAN:STDDEV")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.first)
        if self.kind == "uniform":
            return rng.randint(int(self.first), int(self.second))
        return max(1, round(rng.gauss(self.first, self.second)))

    def __str__(self) -> str:
        return str(int(self.first)) if self.kind == "fixed" else f"{self.kind}:{self.first:g}:{self.second:g}"


@dataclass(frozen=True)
class WorkloadClass:
    """A share of the requests with their input and output lengths."""

    weight: float
    isl: LengthDistribution
    osl: LengthDistribution

    def __str__(self) -> str:
        return f"{self.weight:g}:{self.isl}:{self.osl}"


def parse_mix(spec: str) -> list[WorkloadClass]:
    """`WEIGHT:ISL:OSL,...` (fixed lengths), e.g. DEFAULT_MIX."""
    classes = []
    for entry in spec.split(","):
        parts = entry.split(":")
        if len(parts) != 3:
            raise ValueError(f"bad mix entry {entry!r}: want WEIGHT:ISL:OSL")
        weight = float(parts[0])
        if weight <= 0:
            raise ValueError(f"bad mix entry {entry!r}: the weight must be positive")
        classes.append(WorkloadClass(weight, LengthDistribution.parse(parts[1]), LengthDistribution.parse(parts[2])))
    return classes


def class_counts(weights: Sequence[float], total: int) -> list[int]:
    """Requests per class, proportional to the weights and summing to `total` (largest remainder),
    so that 20% of 40 requests is exactly 8, not whatever a random draw gives."""
    scale = total / sum(weights)
    exact = [weight * scale for weight in weights]
    counts = [int(value) for value in exact]
    by_remainder = sorted(range(len(weights)), key=lambda index: (counts[index] - exact[index], index))
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts


@dataclass(frozen=True)
class BenchmarkRequest:
    prompt: str
    input_tokens: int
    max_tokens: int


def build_requests(
    cutter: PromptCutter, classes: Sequence[WorkloadClass], count: int, seed: int | str
) -> list[BenchmarkRequest]:
    """`count` requests, classes in exact proportions and shuffled; the same seed gives the same list."""
    rng = random.Random(seed)
    order = [index for index, n in enumerate(class_counts([c.weight for c in classes], count)) for _ in range(n)]
    rng.shuffle(order)
    requests = []
    for class_index in order:
        workload = classes[class_index]
        isl, osl = workload.isl.sample(rng), workload.osl.sample(rng)
        requests.append(BenchmarkRequest(cutter.random_prompt(rng, isl), isl, osl))
    return requests


def poisson_arrivals(rate: float, count: int, seed: int | str) -> list[float]:
    """Send times (seconds from the start) of `count` requests arriving at `rate` per second."""
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        now += rng.expovariate(rate)
        times.append(now)
    return times
