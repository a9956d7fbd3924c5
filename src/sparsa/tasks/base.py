"""The ``Task`` interface, length sizing, and the pieces every text task shares.

A task is a frozen dataclass whose fields are its parameters. ``generate`` makes ``n`` samples of ``length``
tokens; each sample is a plain dict (JSON-serialisable) and ``score`` turns a model's output into a number in
[0, 1]. Lengths are in the model's tokens, as in RULER (Hsieh et al. 2024): the haystack is sized with the
tokenizer so that the prompt plus the generation budget fits in ``length``.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import math
import random
from typing import Callable, ClassVar, Sequence

# The prompt plus its generation budget lands in [(1 - TOLERANCE) * length, length] tokens.
TOLERANCE = 0.02

# RULER places needles in prose at one of these depths (percent): round(linspace(0, 100, 40)).
RULER_DEPTHS = [round(100 * i / 39) for i in range(40)]


class LengthError(ValueError):
    """The requested length cannot hold the task's fixed text and answer budget."""


def token_counter(tokenizer) -> Callable[[str], int]:
    """``text -> number of tokens``. Any Hugging Face tokenizer works; ``None`` counts UTF-8 bytes, which is
    exactly what the project's byte-level tokenizer (``sparsa.models.tokenizer``) gives, only faster."""
    if tokenizer is None:
        return lambda text: len(text.encode("utf-8"))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def answer_budget(count: Callable[[str], int], completion: str) -> int:
    """Generation budget for a completion: 1.5x its tokens plus a few, so a model may add a word or two
    (RULER allows 128 tokens for every task; a small reference model needs far less)."""
    return math.ceil(1.5 * count(completion)) + 4


def string_match_all(answers: Sequence[str], output: str) -> float:
    """RULER's metric: the fraction of reference strings that appear in the output, case-insensitive."""
    if not answers:
        raise ValueError("string_match_all needs at least one reference answer")
    text = output.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def open_answer(sample: dict, tokenizer=None) -> dict:
    """Move the completion's leading space into the prompt where the tokenizer makes it a token of its own.

    RULER's prompts end before a space ("... mentioned in the provided text is" then " 8621753"). A byte-level
    tokenizer (the reference models') or a SentencePiece one that splits digits encodes that space as a token of
    its own, so the first generated token is the space. It is the only token the prefill's last position
    produces; every content token comes from decode steps, which attend to the whole cache densely, and a sparse
    prefill is never asked to retrieve (a 256-token window kept 100% of dense on single-needle NIAH at 4K).
    With the space in the prompt the token sequence is the same and the prefill's last position must produce
    the answer's first content token. Tokenizers that merge the space into the next token (GPT-style BPE:
    " 862") are left as RULER writes the prompt. Updates ``prompt``, ``n_tokens`` and ``max_new_tokens`` (their
    sum is unchanged) and returns the sample.
    """
    prompt, answers = sample.get("prompt"), sample.get("answers")
    if not prompt or prompt[-1].isspace() or not answers:
        return sample
    if tokenizer is None:  # bytes: a space is always one token
        n_tokens = sample["n_tokens"] + 1
    else:
        head = tokenizer.encode(prompt + " ", add_special_tokens=False)
        whole = tokenizer.encode(prompt + " " + str(answers[0]), add_special_tokens=False)
        if whole[: len(head)] != head:
            return sample
        n_tokens = len(head)
    added = n_tokens - sample["n_tokens"]
    sample.update(prompt=prompt + " ", n_tokens=n_tokens, max_new_tokens=sample["max_new_tokens"] - added)
    return sample


def join_list(items: Sequence[str]) -> str:
    """RULER's query list: "a", or "a, b, and c"."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def sample_rng(name: str, seed: int, index: int, stream: str = "") -> random.Random:
    """A private generator per (task, seed, sample index, stream). String seeds go through SHA-512 in
    ``random.Random``, so this is stable across processes and Python versions (unlike ``hash``)."""
    return random.Random(f"sparsa.tasks|{name}|{seed}|{index}|{stream}")


def stable_int(*parts) -> int:
    """A 31-bit integer from any printable parts, stable across processes."""
    digest = hashlib.sha256("|".join(map(repr, parts)).encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def fit(build: Callable[[int], str], count: Callable[[str], int], limit: int,
        floor: int) -> tuple[int, str, int]:
    """Choose a haystack size ``u`` so that ``floor <= count(build(u)) <= limit`` (or the largest ``u`` that
    fits when the haystack's granularity makes the window unreachable); returns ``(u, text, tokens)``.

    RULER binary-searches the haystack size, counting the whole prompt at every step. The token count is
    nearly linear in ``u``, so we interpolate instead (bisecting when interpolation stalls): 2-4 full counts
    usually land in the window, which keeps 128K-token prompts cheap for any tokenizer.
    """
    text = build(0)
    tokens = count(text)
    if tokens > limit:
        raise LengthError(f"needs at least {tokens - limit} more tokens for its fixed text and answer budget")
    lo, lo_text, lo_tokens = 0, text, tokens
    hi = hi_tokens = None
    base = tokens
    target = limit - (limit - floor) / 4  # aim inside the window, near its top
    bracketed = 0
    while lo_tokens < floor and (hi is None or hi - lo > 1):
        if hi is None:  # extrapolate from the tokens per unit so far (a 64-unit probe first)
            rate = (lo_tokens - base) / lo if lo else None
            u = lo + (64 if not rate else max(1, int((target - lo_tokens) / rate)))
        elif (bracketed := bracketed + 1) % 3 == 0:
            u = (lo + hi) // 2  # guards against a slow, one-sided interpolation
        else:
            u = lo + int((target - lo_tokens) * (hi - lo) / max(hi_tokens - lo_tokens, 1))
            u = min(max(u, lo + 1), hi - 1)
        text = build(u)
        tokens = count(text)
        if tokens <= limit:
            lo, lo_text, lo_tokens = u, text, tokens
        else:
            hi, hi_tokens = u, tokens
    return lo, lo_text, lo_tokens


class SentenceStream:
    """A lazily extended, deterministic list of sentences, cut by word count.

    Sizing works in words, not sentences: a noise sentence is 90 bytes, too coarse for the ±2% window at
    512 tokens, so the last sentence of a haystack may be cut short at a word boundary.
    """

    def __init__(self, next_sentence: Callable[[], str]):
        self._next = next_sentence
        self.sentences: list[str] = []
        self._ends: list[int] = []  # cumulative word counts

    def _extend(self, words: int):
        while not self._ends or self._ends[-1] < words:
            sent = self._next()
            self.sentences.append(sent)
            self._ends.append((self._ends[-1] if self._ends else 0) + len(sent.split(" ")))

    def take(self, words: int) -> list[str]:
        """The first ``words`` words, as whole sentences plus a possibly cut last one."""
        if words <= 0:
            return []
        self._extend(words)
        full = bisect.bisect_right(self._ends, words)
        out = self.sentences[:full]
        done = self._ends[full - 1] if full else 0
        if done < words:
            out.append(" ".join(self.sentences[full].split(" ")[:words - done]))
        return out


def insert_needles(lines: list[str], needles: Sequence[tuple[float, str]]) -> list[str]:
    """Put each ``(fraction, text)`` needle before haystack line ``int(fraction * len(lines))`` (RULER's
    ``int(len(document_sents) * depth / 100)``); needles landing on the same line keep their given order."""
    n = len(lines)
    slots = sorted((min(int(f * n), n), k) for k, (f, _) in enumerate(needles))
    out, j = [], 0
    for i in range(n + 1):
        while j < len(slots) and slots[j][0] == i:
            out.append(needles[slots[j][1]][1])
            j += 1
        if i < n:
            out.append(lines[i])
    return out


@dataclasses.dataclass(frozen=True)
class Task:
    """Base class: subclasses set ``name`` and implement ``make`` (and ``score`` when not string_match_all).

    ``generate(n, length, seed, tokenizer, depths)`` returns ``n`` samples. Sample ``i`` is a function of
    (task, parameters, seed, i, length, depth) only, so any sample can be regenerated on its own. ``depths``
    (fractions in [0, 1]) are used in turn, sample ``i`` getting ``depths[i % len(depths)]``; ``None`` draws
    a random depth per sample (and records it in ``sample["depth"]``).
    """

    name: ClassVar[str] = ""
    has_depth: ClassVar[bool] = True  # False: depth is meaningless and always None

    def params(self) -> dict:
        return dataclasses.asdict(self)

    def generate(self, n: int, length: int, seed: int, tokenizer=None, depths=None) -> list[dict]:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        if not isinstance(length, int) or length <= 0:
            raise ValueError(f"length must be a positive int (tokens), got {length!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        depths = self._check_depths(depths)
        count = token_counter(tokenizer)
        # a text answer follows the prompt after a space ("... is" then " 8621753"): open_answer moves that space
        # into the prompt where the tokenizer makes it a token of its own (samples without text answers: no-op)
        return [open_answer(self.sample(i, length, seed, count, None if depths is None else depths[i % len(depths)]),
                            tokenizer) for i in range(n)]

    def _check_depths(self, depths):
        if depths is None:
            return None
        if not self.has_depth:
            raise ValueError(f"task {self.name!r} has no needle depth; pass depths=None")
        depths = [depths] if isinstance(depths, (int, float)) else list(depths)
        if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"depths must be fractions in [0, 1], got {depths!r}")
        return [float(d) for d in depths]

    def sample(self, index: int, length: int, seed: int, count: Callable[[str], int],
               depth: float | None) -> dict:
        """One sample: the common fields, then whatever ``make`` returns."""
        out = {"task": self.name, "params": self.params(), "index": index, "seed": seed, "length": length}
        try:
            made = self.make(index, length, seed, count, depth)
        except LengthError as err:
            raise LengthError(f"{self.name} at length {length}: {err}") from None
        out.update(made)
        return out

    def make(self, index: int, length: int, seed: int, count: Callable[[str], int],
             depth: float | None) -> dict:
        """Return at least ``n_tokens, depth, prompt, answers, max_new_tokens``."""
        raise NotImplementedError

    def check(self, sample: dict):
        if sample.get("task") != self.name:
            raise ValueError(f"sample is from task {sample.get('task')!r}, not {self.name!r}")

    def score(self, sample: dict, output: str) -> float:
        """RULER's string_match_all for one sample: fraction of ``sample["answers"]`` in ``output``."""
        self.check(sample)
        return string_match_all(sample["answers"], output)

    def sized(self, build: Callable[[int], str], count: Callable[[str], int], length: int,
              budget: int) -> tuple[int, str, int]:
        """``fit`` with this task's window: prompt + budget in [(1 - TOLERANCE) * length, length]."""
        limit = length - budget
        floor = math.ceil((1 - TOLERANCE) * length) - budget
        if limit < 0:
            raise LengthError(f"the answer budget alone is {budget} tokens")
        return fit(build, count, limit, floor)
