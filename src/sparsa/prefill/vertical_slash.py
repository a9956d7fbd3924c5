"""MInference's vertical-slash pattern, estimated online from the last queries.

Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention"
(NeurIPS 2024), microsoft/MInference. Per head: softmax attention of the last 64 queries over all keys; column
sums rank key columns ("vertical" lines), diagonal sums rank offsets ("slash" lines); the first 30 columns
(sinks) and the nearest 100 diagonals (local) are always kept; the top ``vertical_size`` columns and
``slash_size`` diagonals are computed. Defaults are the sizes MInference's configs use most for Llama-3-8B
at long context (1000 vertical, 6096 slash).

Differences from the official kernel: lines are realised as whole tiles (MInference gathers single vertical
columns inside 64-row blocks). The budgets are spent in the same units: ``vertical_size`` tokens buy
``ceil(vertical_size / block)`` key blocks, ranked by their summed column scores, and ``slash_size`` buy as many
slash tiles per query block. Ranking single columns and then computing their whole tiles, as sparsa did first,
touched nearly every key block at 32K (measured density 0.99 on the H200, 2026-11-29). Sinks and local
diagonals are forced in the same way. 128-token tiles by default, FlexAttention's fast size. Patterns are per
query head; the density is measured by ``density()``.

``slash_tiles``: how slash lines become tiles. A token diagonal crosses two block-diagonals of each query block
(tile ``(r, last_r - t)`` holds ``block - |o - t * block|`` of its entries). ``"weighted"`` (default) ranks the
block-diagonals by the slash mass one of their tiles covers -- each diagonal's mass split between the two in
proportion to its entries in each, from the probes' diagonal sums in half-bands -- and computes one tile per
selected block-diagonal. ``2`` ranks bands of ``block`` diagonals by their sums and computes both
block-diagonals each band crosses (every selected diagonal whole, twice the tiles); ``1`` ranks bands the same
way and computes one tile per band, at the band's own offset (FlexPrefill's official mapping), which covers a
band's far diagonals only in part. On ref-small at 8K-32K ``"weighted"`` kept 99.3% of dense accuracy at density
0.236 at 32K (4.6x SDPA flash at 32K; BENCHMARKS.md, session 9), ``2`` 99.5% at 0.314 (3.6x in the same speed
run), ``1`` 98.9% at 0.237 (session 8).
The local diagonals are forced whole in every mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._shapes import device_key, shape_constant
from ..ops.vertical_slash_blocks import vertical_slash_blocks
from ..pattern import BlockPattern
from ..registry import register
from .base import Selector, check_block, check_int
from .estimate import block_diagonal_scores, pool_blocks, probe_scores


@register("prefill", "vertical_slash")
@dataclass
class VerticalSlash(Selector):
    vertical_size: int = 1000
    slash_size: int = 6096
    last_q: int = 64
    sink_columns: int = 30
    local_diagonals: int = 100
    block: int = 128
    # Dense SDPA below this key length: measured against torch's default SDPA (cuDNN) on the H200, estimation
    # included, 32 query / 8 KV heads of 128 (0.60x at 8K, 1.09x at 16K, 2.68x at 32K; BENCHMARKS.md, session 9).
    # The budget is a fixed token count, so the density at a length -- and this crossover -- hardly depend on
    # the model.
    dense_below: int = 16384
    slash_tiles: int | str = "weighted"

    def __post_init__(self):
        super().__post_init__()
        for name in ("vertical_size", "slash_size", "last_q"):
            check_int(self, name)
        check_int(self, "sink_columns", minimum=0)
        check_int(self, "local_diagonals", minimum=0)
        check_block(self)
        check_slash_tiles(self)

    def select(self, q, k, *, layer_idx=None, key_padding_mask=None):
        lq, lk, bs = q.shape[2], k.shape[2], self.block
        kb = -(-lk // bs)
        n_probe = min(self.last_q, lq)
        q_index = shape_constant(("probe_rows", lq, n_probe, device_key(q.device)),
                                 lambda: torch.arange(lq - n_probe, lq, device=q.device, dtype=torch.int32))
        width = slash_width(self.slash_tiles, bs)
        vertical, bands = probe_scores(q, k, q_index, 1.0 / math.sqrt(q.shape[-1]), key_padding_mask,
                                       slash_block=width)
        if self.slash_tiles == "weighted":
            bands = block_diagonal_scores(bands, width, lk, bs)
        # Top key blocks and bands, their tiles, the sink and the diagonal, compacted into index lists: two
        # Triton launches on CUDA (about twenty-five small PyTorch ops otherwise, ~1.4 ms at 32K on the H200).
        num, idx = vertical_slash_blocks(pool_blocks(vertical, lk, bs), bands, min(-(-self.vertical_size // bs), kb),
                                         min(-(-self.slash_size // bs), kb), forced_columns=-(-self.sink_columns // bs),
                                         forced_bands=local_bands(self.local_diagonals, bs, tiles_per_band(self)),
                                         q_len=lq, kv_len=lk, block=bs, band_tiles=tiles_per_band(self))
        return BlockPattern(num, idx, bs, bs, lq, lk)


def check_slash_tiles(obj):
    if obj.slash_tiles not in (1, 2, "weighted") or isinstance(obj.slash_tiles, bool):
        raise ValueError(f"{obj.name}: slash_tiles must be 1, 2 or 'weighted', got {obj.slash_tiles!r}")


def tiles_per_band(obj) -> int:
    """Tiles per selected slash score (``vertical_slash_blocks``' ``band_tiles``): a weighted score is one
    block-diagonal's."""
    return 1 if obj.slash_tiles == "weighted" else obj.slash_tiles


def slash_width(slash_tiles, block: int) -> int:
    """Diagonals per slash sum the probes return: half-bands for the weighted block-diagonal scores (a tile's
    weights fall from 1 to 0 across a band), whole bands otherwise."""
    return block // 2 if slash_tiles == "weighted" else block


def local_bands(diagonals: int, block: int, tiles: int) -> int:
    """Bands to force so that the first ``diagonals`` token diagonals are computed whole: with two tiles per band
    ``ceil(diagonals / block)``; with one, diagonal ``o`` reaches back to block-diagonal ``ceil(o / block)``, so
    bands ``0 .. ceil((diagonals - 1) / block)``."""
    if diagonals <= 0:
        return 0
    return -(-diagonals // block) if tiles == 2 else -(-(diagonals - 1) // block) + 1
