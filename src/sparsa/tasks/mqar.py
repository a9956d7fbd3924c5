"""MQAR, multi-query associative recall (Zoology: Arora et al. 2023), as a token-id task.

With a byte tokenizer a text version would spend several tokens per key, so MQAR stays at the id level, as
in Zoology's ``multiquery_ar``: a context ``k1 v1 ... kP vP`` (keys from [1, V/2), values from [V/2, V),
distinct within an example), then queries in the remaining ``T - 2P`` positions. Query ``i`` sits at
offset ``2 * gap_i`` after the context, the gaps drawn without replacement with probability proportional
to ``a * (g + 1) ** (a - 1)`` (a = 0.01, favouring early slots); every other position holds a random token.
At a query position the model must predict the key's value; all other positions are ignored.

Samples hold ``input_ids`` (length T), ``target_positions`` and ``targets``; score them with ``score_ids``
from the model's next-token predictions. ``length`` is T and the tokenizer is unused.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Task, stable_int


@dataclasses.dataclass(frozen=True)
class MQAR(Task):
    """``num_kv_pairs`` = None uses T // 16, the ratio of Zoology's standard (64, 4), (128, 8), (256, 16)."""

    name = "mqar"
    has_depth = False
    vocab_size: int = 8192
    num_kv_pairs: int | None = None
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self):
        if not isinstance(self.vocab_size, int) or self.vocab_size < 4:
            raise ValueError(f"mqar: vocab_size must be an int >= 4, got {self.vocab_size!r}")
        if self.num_kv_pairs is not None and (not isinstance(self.num_kv_pairs, int) or self.num_kv_pairs < 1):
            raise ValueError(f"mqar: num_kv_pairs must be a positive int or None, got {self.num_kv_pairs!r}")
        if not isinstance(self.power_a, (int, float)) or not 0 < self.power_a <= 1:
            raise ValueError(f"mqar: power_a must be in (0, 1], got {self.power_a!r}")

    def pairs(self, length: int) -> int:
        return self.num_kv_pairs or max(1, length // 16)

    def check_shape(self, length: int):
        """Zoology's asserts, as ValueErrors (asserts vanish under ``python -O``)."""
        pairs, vocab = self.pairs(length), self.vocab_size
        if length % 2:
            raise ValueError(f"mqar: T (length) must be even, got {length}")
        if vocab <= length:
            raise ValueError(f"mqar: vocab_size must exceed T, got V={vocab}, T={length}")
        if 4 * pairs > length:
            raise ValueError(f"mqar: need 4 * num_kv_pairs <= T, got P={pairs}, T={length}")
        if pairs > vocab // 2 - 1:
            raise ValueError(f"mqar: {pairs} distinct keys do not fit in [1, {vocab // 2})")

    def generate(self, n, length, seed, tokenizer=None, depths=None):
        self.check_shape(length)
        return super().generate(n, length, seed, tokenizer, depths)

    def make(self, index, length, seed, count, depth):
        rng = np.random.default_rng(stable_int("sparsa.tasks", self.name, seed, index))
        vocab, pairs = self.vocab_size, self.pairs(length)
        half = vocab // 2
        keys = rng.choice(np.arange(1, half), size=pairs, replace=False)
        values = rng.choice(np.arange(half, vocab), size=pairs, replace=False)
        context = 2 * pairs
        space = (length - context) // 2
        p = self.power_a * np.arange(1, space + 1) ** (self.power_a - 1)
        gaps = rng.choice(space, size=pairs, replace=False, p=p / p.sum())

        ids = np.zeros(length, dtype=np.int64)
        ids[0:context:2], ids[1:context:2] = keys, values
        positions = context + 2 * gaps
        ids[positions] = keys
        if self.random_non_queries:
            # Zoology fills every still-empty slot (0) with a random token from the whole vocabulary.
            empty = ids == 0
            ids[empty] = rng.integers(0, vocab, size=int(empty.sum()))
        order = np.argsort(positions)
        return {"n_tokens": length, "depth": None, "prompt": None, "answers": [], "max_new_tokens": 0,
                "input_ids": ids.tolist(), "target_positions": positions[order].tolist(),
                "targets": values[order].tolist()}

    def score(self, sample: dict, output) -> float:
        raise TypeError("mqar is scored on token ids: use score_ids(sample, predicted_ids)")

    def score_ids(self, sample: dict, predicted_ids) -> float:
        """Accuracy at the query positions. ``predicted_ids[t]`` is the model's prediction for the token after
        position ``t`` (argmax of the logits at ``t``), for all T positions of ``input_ids``."""
        self.check(sample)
        if len(predicted_ids) != len(sample["input_ids"]):
            raise ValueError(f"mqar: need one prediction per input position ({len(sample['input_ids'])}), "
                             f"got {len(predicted_ids)}")
        hits = [int(predicted_ids[p]) == t for p, t in zip(sample["target_positions"], sample["targets"])]
        return sum(hits) / len(hits)


def labels(sample: dict, ignore_index: int = -100) -> list[int]:
    """Zoology's label vector: the target at each query position, ``ignore_index`` elsewhere."""
    out = [ignore_index] * len(sample["input_ids"])
    for p, t in zip(sample["target_positions"], sample["targets"]):
        out[p] = t
    return out


def score_ids(sample: dict, predicted_ids) -> float:
    """Module-level shortcut for ``MQAR(**sample["params"]).score_ids``."""
    return MQAR(**sample["params"]).score_ids(sample, predicted_ids)
