"""Causal sliding-window (1-D neighbourhood) attention, optionally dilated.

Window semantics as in Mistral 7B (Jiang et al. 2023, window 4096) and, with dilation, as NATTEN's causal
1-D neighbourhood attention (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023; "Dilated
Neighborhood Attention Transformer", 2022): each query sees itself and its ``window - 1`` previous
neighbours, ``dilation`` positions apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..pattern import BlockPattern
from ..registry import register
from .base import Selector, check_block, check_int


@register("prefill", "sliding_window")
@dataclass
class SlidingWindow(Selector):
    static = True
    window: int = 4096
    dilation: int = 1
    block: int = 128

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "window")
        check_int(self, "dilation")
        check_block(self)

    def select(self, q, k, *, layer_idx=None):
        return BlockPattern.sliding_window(q.shape[2], k.shape[2], window=self.window, dilation=self.dilation,
                                           causal=True, block_q=self.block, device=q.device)
