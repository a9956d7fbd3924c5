"""Offline, seeded long-context tasks with their scorers (recipes: shared/TASKS.md).

    task = sparsa.tasks.get("niah_single", haystack="prose")
    samples = task.generate(n=8, length=8192, seed=0, tokenizer=tok)        # list of plain dicts
    score = task.score(samples[0], model_output)                            # in [0, 1]
    cells = sparsa.tasks.grid("passkey", [4096, 16384], [0.0, 0.5, 1.0], 4, seed=0, tokenizer=tok)

Tasks: ``passkey`` (Landmark Attention: Mohtashami & Jaggi 2023); RULER's ``niah_single``,
``niah_multikey``, ``niah_multivalue``, ``niah_multiquery``, ``vt``, ``cwe``, ``fwe`` (Hsieh et al. 2024);
``mqar`` (Zoology: Arora et al. 2023; token ids, scored with ``score_ids``); ``perplexity`` (held-out prose,
loss computed by the runner). Every sample has ``task, params, index, seed, length, n_tokens, depth, prompt,
answers, max_new_tokens``; ``prompt`` ends with the answer prefix and ``n_tokens`` counts it without special
tokens, and ``n_tokens + max_new_tokens`` lies in [0.98 * length, length]. Where the tokenizer makes the
answer's leading space a token of its own (byte-level, digit-splitting SentencePiece), the prompt ends with
that space, so the prefill's last position produces the answer's first content token (``open_answer``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os

from .base import TOLERANCE, LengthError, Task, open_answer, stable_int, string_match_all
from .cwe import CommonWords
from .fwe import FrequentWords
from .mqar import MQAR, score_ids
from .niah import NiahMultikey, NiahMultiquery, NiahMultivalue, NiahSingle
from .passkey import Passkey
from .perplexity import HELDOUT_SEED_BASE, Perplexity
from .vt import VariableTracking

# Bumped when the same (task, parameters, seed, length) makes a different prompt, so that `sparsa bench` does not
# resume results measured on the old prompts. 2: the answer's leading space moved into the prompt (open_answer).
FORMAT = 2

_TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    Passkey, NiahSingle, NiahMultikey, NiahMultivalue, NiahMultiquery, VariableTracking, CommonWords,
    FrequentWords, MQAR, Perplexity)}


def names() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_TASKS)


def get(name: str, **params) -> Task:
    """A task by name, with its parameters (unknown names or parameters raise ValueError listing the allowed
    ones)."""
    if name not in _TASKS:
        hint = difflib.get_close_matches(str(name), _TASKS, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown task {name!r}{extra}; allowed values: {names()}")
    cls = _TASKS[name]
    allowed = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    for key in params:
        if key not in allowed:
            raise ValueError(f"unknown parameter {key!r} for task {name!r}; allowed: {allowed}")
    return cls(**params)


def task_of(sample: dict) -> Task:
    """The task object that made ``sample``."""
    return get(sample["task"], **sample.get("params", {}))


def score(sample: dict, output: str) -> float:
    """Score one sample's output with the task that made it."""
    return task_of(sample).score(sample, output)


def cell_seed(seed: int, length: int, depth: float | None) -> int:
    """The seed of one (length, depth) grid cell: fixed for a base seed, and independent of the other cells,
    so adding a length or depth leaves every existing cell's samples unchanged and two runs compare."""
    return stable_int("grid", seed, length, None if depth is None else float(depth))


def grid(task, lengths, depths, n_per_cell: int, seed: int, tokenizer=None) -> list[dict]:
    """Samples for every (length, depth) cell, ``n_per_cell`` each, for heatmaps. ``task`` is a name or a
    ``Task``. Tasks without a depth (cwe, fwe, mqar, perplexity) ignore ``depths`` and get one cell per length
    (depth None); ``depths=None`` also gives one cell per length, with random depths."""
    task = get(task) if isinstance(task, str) else task
    cells = [None] if depths is None or not task.has_depth else [float(d) for d in depths]
    samples = []
    for length in lengths:
        for depth in cells:
            s = cell_seed(seed, length, depth)
            for sample in task.generate(n_per_cell, length, s, tokenizer, None if depth is None else [depth]):
                sample["cell"] = {"length": length, "depth": depth}
                samples.append(sample)
    return samples


def save_jsonl(samples, path) -> None:
    """One JSON object per line (UTF-8)."""
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")


def load_jsonl(path) -> list[dict]:
    with open(os.fspath(path), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


__all__ = ["Task", "LengthError", "TOLERANCE", "HELDOUT_SEED_BASE", "names", "get", "task_of", "score",
           "score_ids", "grid", "cell_seed", "save_jsonl", "load_jsonl", "string_match_all", "open_answer", "FORMAT"]
