"""RULER's needle-in-a-haystack family (Hsieh et al. 2024): single, multi-key, multi-value, multi-query.

Needle: "One of the special magic numbers for {key} is: {value}." with "adjective-noun" keys and 7-digit
values. Haystacks: ``noise`` (the grass sentence repeated, lines joined by "\\n"), ``prose`` (sentences from
the seeded grammar in ``words``, joined by spaces; a stand-in for RULER's essays, never downloaded) and
``needle`` (RULER's distractor haystack: every line is a needle for some other key). Prompt and answer
prefix are RULER's, in the singular when one key and one value are asked for. Score: string_match_all.

``depth`` places the first answer needle (the queried key's first value); the other needles go at random
depths: uniform for noise/needle haystacks, drawn from RULER's 40 depths for prose.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from .base import (RULER_DEPTHS, SentenceStream, Task, answer_budget, insert_needles, join_list,
                   sample_rng)
from .words import NOISE, key_word, sentence

HAYSTACKS = ("noise", "prose", "needle")

NEEDLE = "One of the special magic {type} for {key} is: {value}."
TEMPLATE = ("Some special magic {type} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type} afterwards.\n{context}\n"
            "What are all the special magic {type} for {query} mentioned in the provided text?")
ANSWER_PREFIX = " The special magic {type} for {query} mentioned in the provided text are"


def singular(text: str) -> str:
    """RULER's rewrite of the template when one key and one value are asked for."""
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


def value7(rng) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def needle(key: str, value: str) -> str:
    # RULER formats the needle with the plural type even in the single-needle task.
    return NEEDLE.format(type="numbers", key=key, value=value)


@dataclasses.dataclass(frozen=True)
class Niah(Task):
    """One RULER NIAH variant; subclasses fix how many keys, values per key and queried keys there are."""

    haystack: str = "noise"
    #: every key has the same length in characters (training data: ref-small matched keys by their length, a
    #: shortcut that fails whenever two keys are as long; the RULER task draws keys freely, the default)
    same_length_keys: bool = False

    num_keys: ClassVar[int] = 1
    num_values: ClassVar[int] = 1
    num_queries: ClassVar[int] = 1

    def __post_init__(self):
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"{self.name}: unknown haystack {self.haystack!r}; allowed values: {list(HAYSTACKS)}")

    def prompt_text(self, context: str, queries: list[str]) -> str:
        one = self.num_queries * self.num_values == 1
        kind = "number" if one else "numbers"
        text = TEMPLATE.format(type=kind, context="\0", query="\1")
        prefix = ANSWER_PREFIX.format(type=kind, query="\1")
        if one:
            text, prefix = singular(text), singular(prefix)
        # The context goes in last so the singular rewrite never touches haystack text.
        query = join_list(queries)
        return (text + prefix).replace("\1", query).replace("\0", context)

    def make(self, index, length, seed, count, depth):
        rng = sample_rng(self.name, seed, index)
        keys: list[str] = []
        draws = 0
        while len(keys) < self.num_keys:
            key = key_word(rng)
            draws += 1
            if self.same_length_keys and keys and len(key) != len(keys[0]):
                if draws > 10_000:  # a length with too few keys: start over from a new first key
                    keys, draws = [], 0
                continue
            if key not in keys:
                keys.append(key)
        seen: set[str] = set()
        values: list[list[str]] = []
        for _ in keys:
            row = []
            while len(row) < self.num_values:
                value = value7(rng)
                if value not in seen:
                    seen.add(value)
                    row.append(value)
            values.append(row)
        queried = rng.sample(range(self.num_keys), self.num_queries)
        answers = [v for i in queried for v in values[i]]

        # The first answer needle comes first; the rest in random order (RULER shuffles all needles).
        first = (queried[0], 0)
        rest = [(i, j) for i in range(self.num_keys) for j in range(self.num_values) if (i, j) != first]
        rng.shuffle(rest)
        texts = [needle(keys[i], values[i][j]) for i, j in [first] + rest]
        if self.haystack == "prose":
            fractions = [d / 100 for d in rng.sample(RULER_DEPTHS, len(texts))]
        else:
            fractions = [rng.random() for _ in texts]
        if depth is None:
            depth = fractions[0]
        fractions[0] = depth
        stream, sep = self.stream(seed, index, set(keys), seen)
        budget = answer_budget(count, " " + ", ".join(answers) + ".")
        queries = [keys[i] for i in queried]

        def build(words: int) -> str:
            lines = insert_needles(stream.take(words), list(zip(fractions, texts)))
            return self.prompt_text(sep.join(lines), queries)

        _, prompt, n_tokens = self.sized(build, count, length, budget)
        return {"n_tokens": n_tokens, "depth": depth, "prompt": prompt, "answers": answers,
                "max_new_tokens": budget, "keys": keys, "queries": queries, "needles": texts}

    def stream(self, seed, index, keys: set[str], values: set[str]) -> tuple[SentenceStream, str]:
        """The haystack's sentence stream and separator. Prose and distractors have their own generator,
        so the haystack does not change when the needles do."""
        if self.haystack == "noise":
            return SentenceStream(lambda: NOISE), "\n"
        rng = sample_rng(self.name, seed, index, "haystack")
        if self.haystack == "prose":
            return SentenceStream(lambda: sentence(rng)), " "

        def distractor() -> str:
            key, value = key_word(rng), value7(rng)
            while key in keys:
                key = key_word(rng)
            while value in values:
                value = value7(rng)
            return needle(key, value)

        return SentenceStream(distractor), "\n"


@dataclasses.dataclass(frozen=True)
class NiahSingle(Niah):
    """One key, one value (RULER niah_single)."""

    name = "niah_single"


@dataclasses.dataclass(frozen=True)
class NiahMultikey(Niah):
    """Four keys with one value each, one of them queried (RULER niah_multikey)."""

    name = "niah_multikey"
    num_keys = 4


@dataclasses.dataclass(frozen=True)
class NiahMultivalue(Niah):
    """One key with four values, all required (RULER niah_multivalue)."""

    name = "niah_multivalue"
    num_values = 4


@dataclasses.dataclass(frozen=True)
class NiahMultiquery(Niah):
    """Four keys with one value each, all queried (RULER niah_multiquery)."""

    name = "niah_multiquery"
    num_keys = 4
    num_queries = 4
