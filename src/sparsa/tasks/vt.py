"""RULER variable tracking (Hsieh et al. 2024).

A chain "VAR A = 12345." then hops "VAR B = VAR A." ... (4 hops, 5 variables of 5 uppercase letters) sits
in order at random lines of the noise haystack; the question asks for every variable holding the value.
Extra chains (``chains`` > 1) are distractors with other values. RULER joins the chain statements to the
noise with spaces and no full stop; we give each statement its own line and a full stop, as TASKS.md writes
them. Score: string_match_all over the queried chain's names.
"""

from __future__ import annotations

import dataclasses
import string

from .base import SentenceStream, Task, answer_budget, insert_needles, sample_rng
from .words import NOISE

TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
            "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.")
# "assgined" is RULER's spelling; kept so prompts match the benchmark's byte for byte.
ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                 "variables are assgined the value {query}, they are: ")


@dataclasses.dataclass(frozen=True)
class VariableTracking(Task):
    """``hops`` assignments after the first (``hops + 1`` names); ``depth`` is the first statement's."""

    name = "vt"
    hops: int = 4
    chains: int = 1

    def __post_init__(self):
        if not isinstance(self.hops, int) or self.hops < 1:
            raise ValueError(f"vt: hops must be an int >= 1, got {self.hops!r}")
        if not isinstance(self.chains, int) or self.chains < 1:
            raise ValueError(f"vt: chains must be an int >= 1, got {self.chains!r}")

    def make(self, index, length, seed, count, depth):
        rng = sample_rng(self.name, seed, index)
        names: list[str] = []
        while len(names) < self.chains * (self.hops + 1):
            var = "".join(rng.choices(string.ascii_uppercase, k=5))
            if var not in names:
                names.append(var)
        values: list[int] = []
        while len(values) < self.chains:
            value = rng.randint(10000, 99999)
            if value not in values:
                values.append(value)

        needles: list[tuple[float, str]] = []
        first_depth = None
        for c in range(self.chains):
            chain = names[c * (self.hops + 1):(c + 1) * (self.hops + 1)]
            # RULER: the chain's lines at sorted random positions. With a given depth the first line goes
            # there and the hops at sorted random positions after it. Both draws always happen, so a
            # given depth changes only the placement.
            spots = sorted(rng.random() for _ in range(self.hops + 1))
            after = sorted(rng.random() for _ in range(self.hops))
            if c == 0 and depth is not None:
                spots = [depth] + [depth + (1 - depth) * x for x in after]
            if c == 0:
                first_depth = spots[0]
            lines = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
            needles += list(zip(spots, lines))

        answers = names[:self.hops + 1]
        query = str(values[0])
        prefix = ANSWER_PREFIX.format(num_v=self.hops + 1, query=query)
        budget = answer_budget(count, " " + ", ".join(answers))
        stream = SentenceStream(lambda: NOISE)

        def build(words: int) -> str:
            context = "\n".join(insert_needles(stream.take(words), needles))
            return TEMPLATE.format(context=context, query=query) + prefix

        _, prompt, n_tokens = self.sized(build, count, length, budget)
        return {"n_tokens": n_tokens, "depth": first_depth, "prompt": prompt, "answers": answers,
                "max_new_tokens": budget, "value": query}
