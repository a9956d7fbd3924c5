"""The decode policy interface: which cached keys and values a new query reads.

Policies (DuoAttention, Quest, RetrievalAttention, ...) arrive in later issues; ``dense`` reads everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..registry import register


@dataclass
class DecodePolicy:
    name: ClassVar[str] = "policy"

    def make_cache(self, config):
        """A Hugging Face ``Cache`` for this policy, or ``None`` for the model's default cache."""
        return None


@register("decode", "dense")
@dataclass
class DenseDecode(DecodePolicy):
    """Every cached key, every step (the model's own dynamic cache)."""
