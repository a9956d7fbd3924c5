"""Dense causal attention through sparsa's own kernel (FlexAttention on the GPU): every visible tile."""

from __future__ import annotations

from dataclasses import dataclass

from ..pattern import BlockPattern
from ..registry import register
from .base import Selector, check_block


@register("prefill", "dense")
@dataclass
class Dense(Selector):
    static = True
    block: int = 128
    dense_below: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_block(self)

    def select(self, q, k, *, layer_idx=None):
        return BlockPattern.dense(q.shape[2], k.shape[2], block_q=self.block, device=q.device)
