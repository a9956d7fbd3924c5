"""Held-out perplexity text from the prose grammar.

There is no output to score: the benchmark runner feeds ``sample["text"]`` to the model and computes the
mean next-token loss over tokens ``loss_start`` onwards (the last ``tail`` of the window, where long
context can help), then reports the dense/sparse difference. ``score`` therefore raises.

Held-out means a seed range nothing else uses: the prose is drawn with seed ``seed + HELDOUT_SEED_BASE``, so
code that trains on the same grammar must keep its seeds below ``HELDOUT_SEED_BASE``.
"""

from __future__ import annotations

import dataclasses
import math

from .base import SentenceStream, Task, sample_rng
from .words import sentence

HELDOUT_SEED_BASE = 1 << 40


@dataclasses.dataclass(frozen=True)
class Perplexity(Task):
    name = "perplexity"
    has_depth = False
    tail: float = 0.5

    def __post_init__(self):
        if not isinstance(self.tail, (int, float)) or not 0 < self.tail <= 1:
            raise ValueError(f"perplexity: tail must be a fraction in (0, 1], got {self.tail!r}")

    def make(self, index, length, seed, count, depth):
        rng = sample_rng(self.name, seed + HELDOUT_SEED_BASE, index, "prose")
        stream = SentenceStream(lambda: sentence(rng))
        _, text, n_tokens = self.sized(lambda words: " ".join(stream.take(words)), count, length, 0)
        return {"n_tokens": n_tokens, "depth": None, "prompt": text, "text": text, "answers": [],
                "max_new_tokens": 0, "loss_start": n_tokens - math.ceil(self.tail * n_tokens)}

    def score(self, sample: dict, output: str) -> float:
        raise NotImplementedError("perplexity has no output to score: the benchmark runner computes the mean "
                                  "next-token loss of sample['text'] from token sample['loss_start'] on")
