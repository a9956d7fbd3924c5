"""RULER common words extraction (Hsieh et al. 2024).

A shuffled, numbered list ("1. word 2. word ...") where ``num_common`` words appear ``freq_common`` times
and the others ``freq_uncommon`` times; the answer is the common words. RULER's frequencies are 30 and 3,
or 6 and 1 below 4096 tokens; ``None`` keeps that rule. Words are real words from ``words`` first, then
made-up pronounceable ones when a long list needs more. RULER's one in-context example is left out.
Score: string_match_all over the common words.
"""

from __future__ import annotations

import dataclasses
import math

from .base import Task, answer_budget, sample_rng
from .words import pseudo_word, real_words

TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n{context}\n"
            "Question: What are the {n} most common words in the above list?")
ANSWER_PREFIX = " Answer: The top {n} words that appear most often in the list are:"


class WordSupply:
    """The uncommon words of one sample, in a fixed order: shuffled real words, then made-up ones."""

    def __init__(self, rng, exclude: set[str]):
        self._rng = rng
        self.words = [w for w in real_words() if w not in exclude]
        rng.shuffle(self.words)
        self._seen = set(self.words) | exclude

    def first(self, k: int) -> list[str]:
        while len(self.words) < k:
            word = pseudo_word(self._rng)
            if word not in self._seen:
                self._seen.add(word)
                self.words.append(word)
        return self.words[:k]


@dataclasses.dataclass(frozen=True)
class CommonWords(Task):
    """The haystack size is the number of uncommon list entries; the last uncommon word may appear fewer
    than ``freq_uncommon`` times, which keeps sizing fine-grained and cannot change the answer."""

    name = "cwe"
    has_depth = False
    num_common: int = 10
    freq_common: int | None = None
    freq_uncommon: int | None = None

    def __post_init__(self):
        for field in ("num_common", "freq_common", "freq_uncommon"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"cwe: {field} must be a positive int or None, got {value!r}")

    def frequencies(self, length: int) -> tuple[int, int]:
        short = length < 4096  # RULER's rule for short contexts
        common = self.freq_common or (6 if short else 30)
        uncommon = self.freq_uncommon or (1 if short else 3)
        if uncommon >= common:
            raise ValueError(f"cwe: freq_uncommon ({uncommon}) must be below freq_common ({common})")
        return common, uncommon

    def make(self, index, length, seed, count, depth):
        rng = sample_rng(self.name, seed, index)
        freq_common, freq_uncommon = self.frequencies(length)
        common = rng.sample(real_words(), self.num_common)
        supply = WordSupply(rng, set(common))
        n = self.num_common
        head = TEMPLATE.replace("{n}", str(n))
        tail = ANSWER_PREFIX.format(n=n)
        budget = answer_budget(count, " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(common)))

        def build(entries: int) -> str:
            distinct = math.ceil(entries / freq_uncommon)
            words = common * freq_common
            for i, word in enumerate(supply.first(distinct)):
                words += [word] * min(freq_uncommon, entries - i * freq_uncommon)
            sample_rng(self.name, seed, index, f"shuffle{entries}").shuffle(words)
            context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
            return head.replace("{context}", context) + tail

        _, prompt, n_tokens = self.sized(build, count, length, budget)
        return {"n_tokens": n_tokens, "depth": None, "prompt": prompt, "answers": common,
                "max_new_tokens": budget}
