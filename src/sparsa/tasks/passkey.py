"""Passkey retrieval, Landmark Attention's version (Mohtashami & Jaggi 2023).

The prompt is five parts joined by "\\n": the task description, a garbage prefix, the pass-key line, a
garbage suffix and the question. Garbage is the repeated grass sentence cut at a character count, as in the
paper's generator (``garbage_inf[:n]`` for both prefix and suffix); the key is randint(1, 50000) at a
uniformly random depth. Score: the first integer in the output equals the key.
"""

from __future__ import annotations

import dataclasses
import re

from .base import Task, answer_budget, sample_rng
from .words import NOISE

DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
               "I will quiz you about the important information there.")
QUESTION = "What is the pass key? The pass key is"
MAX_KEY = 50000
_INTEGER = re.compile(r"\d+")


def garbage(chars: int) -> str:
    """The first ``chars`` characters of the grass sentence repeated, joined by spaces."""
    reps = chars // (len(NOISE) + 1) + 1
    return " ".join([NOISE] * reps)[:chars]


def information_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@dataclasses.dataclass(frozen=True)
class Passkey(Task):
    """Landmark Attention's passkey retrieval; ``depth`` is the prefix's share of the garbage."""

    name = "passkey"

    def make(self, index, length, seed, count, depth):
        rng = sample_rng(self.name, seed, index)
        drawn = rng.random()  # always drawn, so a given depth changes only the placement
        key = rng.randint(1, MAX_KEY)
        depth = drawn if depth is None else depth
        # One budget for every key: the longest key's completion, so sizing does not depend on the key.
        budget = answer_budget(count, f" {MAX_KEY}.")

        def build(chars: int) -> str:
            prefix = round(depth * chars)
            return "\n".join([DESCRIPTION, garbage(prefix), information_line(key), garbage(chars - prefix),
                              QUESTION])

        chars, prompt, n_tokens = self.sized(build, count, length, budget)
        return {"n_tokens": n_tokens, "depth": depth, "prompt": prompt, "answers": [str(key)],
                "max_new_tokens": budget, "garbage_chars": chars}

    def score(self, sample: dict, output: str) -> float:
        """1.0 when the first integer in ``output`` is the pass key (Landmark's check), else 0.0."""
        self.check(sample)
        match = _INTEGER.search(output)
        return float(match is not None and int(match.group()) == int(sample["answers"][0]))
