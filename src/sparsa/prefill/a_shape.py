"""A-shape: initial tokens plus a local band (MInference's static pattern).

Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention"
(NeurIPS 2024). Defaults from the official configs: n_init = 128, n_local = 3968 (4096 tokens in all).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..pattern import BlockPattern
from ..registry import register
from .base import Selector, check_block, check_int


@register("prefill", "a_shape")
@dataclass
class AShape(Selector):
    static = True
    n_init: int = 128
    n_local: int = 3968
    block: int = 128

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "n_init", minimum=0)
        check_int(self, "n_local")
        check_block(self)

    def select(self, q, k, *, layer_idx=None):
        return BlockPattern.streaming(q.shape[2], k.shape[2], sink=self.n_init, window=self.n_local,
                                      block_q=self.block, device=q.device)
