"""MInference's vertical-slash pattern, estimated online from the last queries.

Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention"
(NeurIPS 2024), microsoft/MInference. Per head: softmax attention of the last 64 queries over all keys; column
sums rank key columns ("vertical" lines), diagonal sums rank offsets ("slash" lines); the first 30 columns
(sinks) and the nearest 100 diagonals (local) are always kept; the top ``vertical_size`` columns and
``slash_size`` diagonals are computed. Defaults are the sizes MInference's configs use most for Llama-3-8B
at long context (1000 vertical, 6096 slash).

Differences from the official kernel: lines are realised as whole tiles (MInference gathers single vertical
columns inside 64-row blocks), so the computed density is higher than the token counts suggest, and measured
honestly by ``density()``; 128-token tiles by default, FlexAttention's fast size. Patterns are per query head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..pattern import BlockPattern
from ..registry import register
from .base import Selector, check_block, check_int
from .estimate import force_sink_and_diagonal, probe_scores, top_indices, vertical_slash_tiles


@register("prefill", "vertical_slash")
@dataclass
class VerticalSlash(Selector):
    vertical_size: int = 1000
    slash_size: int = 6096
    last_q: int = 64
    sink_columns: int = 30
    local_diagonals: int = 100
    block: int = 128

    def __post_init__(self):
        super().__post_init__()
        for name in ("vertical_size", "slash_size", "last_q"):
            check_int(self, name)
        check_int(self, "sink_columns", minimum=0)
        check_int(self, "local_diagonals", minimum=0)
        check_block(self)

    def select(self, q, k, *, layer_idx=None, key_padding_mask=None):
        lq, lk = q.shape[2], k.shape[2]
        q_index = torch.arange(lq - min(self.last_q, lq), lq, device=q.device)
        vertical, slash = probe_scores(q, k, q_index, 1.0 / math.sqrt(q.shape[-1]), key_padding_mask)
        columns = top_indices(vertical, min(self.vertical_size, lk), forced=min(self.sink_columns, lk))
        diagonals = top_indices(slash, min(self.slash_size, lk), forced=min(self.local_diagonals, lk))
        tiles = vertical_slash_tiles(columns, diagonals, lq, lk, self.block)
        tiles = force_sink_and_diagonal(tiles, lq, lk, self.block, self.block)
        return BlockPattern.from_block_mask(tiles, q_len=lq, kv_len=lk, block_q=self.block)
