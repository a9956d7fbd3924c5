"""MoA: a sink block plus a per-head sliding band whose span grows with the length, S_h(N) = alpha_h + beta_h*N.

Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression" (2024),
thu-nics/MoA. The spans come from MoA's profiling and search (a calibration step); here they are given:
``alpha`` (tokens) and ``beta`` (fraction of the length), one value per head (query or KV heads), or one
list per layer. Sink block of 64 tokens and 64-token blocks as in the official block generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..pattern import BlockPattern
from ..registry import register
from .base import Selector, check_block, check_int


@register("prefill", "moa")
@dataclass
class MoA(Selector):
    static = True
    per_layer = True
    alpha: list = field(default_factory=list)
    beta: list = field(default_factory=list)
    sink: int = 64
    block: int = 64

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "sink", minimum=0)
        check_block(self)
        if not self.alpha or not self.beta:
            raise ValueError("moa: alpha and beta are required (spans alpha_h + beta_h * N, one per head or one "
                             "list per layer), e.g. configure(model, prefill='moa', alpha=[1024]*8, beta=[0.1]*8)")
        if _depth(self.alpha) != _depth(self.beta) or len(self.alpha) != len(self.beta):
            raise ValueError("moa: alpha and beta must have the same structure (per head, or per layer and head)")

    def spans_for(self, layer_idx):
        if _depth(self.alpha) == 2:
            if layer_idx is None or layer_idx >= len(self.alpha):
                raise ValueError(f"moa: per-layer spans given for {len(self.alpha)} layers; no entry for "
                                 f"layer {layer_idx}")
            return self.alpha[layer_idx], self.beta[layer_idx]
        return self.alpha, self.beta

    def select(self, q, k, *, layer_idx=None):
        alpha, beta = self.spans_for(layer_idx)
        if len(alpha) not in (1, q.shape[1], k.shape[1]):
            raise ValueError(f"moa: {len(alpha)} spans given; need 1, {k.shape[1]} (KV heads) or {q.shape[1]} "
                             "(query heads)")
        return BlockPattern.spans(q.shape[2], k.shape[2], alpha=alpha, beta=beta, sink=self.sink,
                                  block=self.block, device=q.device)


def _depth(x):
    return 2 if x and isinstance(x[0], (list, tuple)) else 1
