"""RULER frequent words extraction (Hsieh et al. 2024).

A vocabulary of ``length // 50`` coded words (6 random lowercase letters); with ``N`` words of text, the
word of rank ``k`` appears ``floor(N * k**-alpha / zeta(alpha))`` times (alpha = 2), shuffled. Rank 1 is
replaced by "..." (noise the question says to ignore); the answer is ranks 2-4. Score: string_match_all.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from .base import LengthError, Task, answer_budget, sample_rng
from .words import coded_word

TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
            "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?")
ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


@functools.lru_cache(maxsize=None)
def zeta(alpha: float) -> float:
    """Riemann zeta for alpha > 1 (pi^2/6 at 2): partial sum plus the integral tail."""
    if alpha == 2.0:
        return math.pi ** 2 / 6
    n = 100_000
    return sum(k ** -alpha for k in range(1, n)) + n ** (1 - alpha) / (alpha - 1)


def zipf_counts(total: int, vocab: int, alpha: float) -> list[int]:
    """RULER's counts: floor(total * k**-alpha / zeta(alpha)) for ranks k = 1..vocab."""
    z = zeta(float(alpha))
    return [int(total * k ** -alpha / z) for k in range(1, vocab + 1)]


@dataclasses.dataclass(frozen=True)
class FrequentWords(Task):
    """The haystack size is ``N``, RULER's ``num_words``."""

    name = "fwe"
    has_depth = False
    alpha: float = 2.0
    word_length: int = 6

    def __post_init__(self):
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 1:
            raise ValueError(f"fwe: alpha must be a number > 1, got {self.alpha!r}")
        if not isinstance(self.word_length, int) or self.word_length < 3:
            raise ValueError(f"fwe: word_length must be an int >= 3, got {self.word_length!r}")

    def make(self, index, length, seed, count, depth):
        rng = sample_rng(self.name, seed, index)
        size = max(length // 50, 5)  # RULER: vocab_size = max_seq_length // 50
        vocab: list[str] = []
        while len(vocab) < size:
            word = coded_word(rng, self.word_length)
            if word not in vocab:
                vocab.append(word)
        vocab[0] = "..."
        answers = vocab[1:4]
        budget = answer_budget(count, " " + ", ".join(answers))

        def build(total: int) -> str:
            words = [w for w, c in zip(vocab, zipf_counts(total, size, self.alpha)) for _ in range(c)]
            sample_rng(self.name, seed, index, f"shuffle{total}").shuffle(words)
            return TEMPLATE.format(context=" ".join(words)) + ANSWER_PREFIX

        total, prompt, n_tokens = self.sized(build, count, length, budget)
        counts = zipf_counts(total, size, self.alpha)
        # Ranks 2-4 must be strictly the most frequent words after "...", or the answer is ambiguous.
        if not counts[1] > counts[2] > counts[3] > counts[4]:
            raise LengthError(f"too short: {total} words give counts {counts[:5]}, so ranks 2-4 tie")
        return {"n_tokens": n_tokens, "depth": None, "prompt": prompt, "answers": answers,
                "max_new_tokens": budget}
