"""FlexPrefill: per head, a query-aware or a vertical-slash pattern, sized to cover a fraction of the attention.

Lai et al., "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference"
(ICLR 2025), ByteDance-Seed/FlexPrefill. Per head:

1. probe attention ``A`` of a block of queries over all keys; vertical scores (column means) and slash scores
   (diagonal sums);
2. budgets: the fewest columns / diagonals covering ``gamma`` of the mass, in blocks, at least
   ``min_budget`` tokens;
3. the Jensen-Shannon distance between the probe's block-pooled vertical scores and a pooled estimate
   softmax(mean(q) . blockmean(K)): below ``tau`` the pooled estimate is trusted and the head is
   "query-aware" -- block attention of every pooled query block over pooled keys, largest tiles kept until
   ``gamma`` of the whole map's mass (plus ``min_budget`` vertical/slash lines); otherwise the head takes
   its top vertical and slash blocks.

Defaults from the official code: 128-token blocks, gamma 0.9, tau 0.1, min_budget 1024 (scripts and patch
default; the README says 512), no max budget; dense when the keys fit in max(2 blocks, min_budget).

Slash budgets and tiles: the official code counts the *token* diagonals that cover ``gamma`` of the slash mass,
divides by the block and adds one (``slash_count="diagonals"``), and computes one tile per selected band and
query block (``slash_tiles=1``). sparsa first counted whole bands covering ``gamma`` (``"bands"``) and computed
both block-diagonals a band crosses (``slash_tiles=2``): more tiles, the same selection order. The default,
``slash_tiles="weighted"`` (as in vertical_slash), ranks the block-diagonals themselves by the slash mass one of
their tiles covers, and ``"bands"`` counts the block-diagonals covering ``gamma`` of those scores: one tile per
block-diagonal, placed where the mass is (0.481 density at 32K on ref-small, session 9, against 0.509 with ``2``,
session 8; BENCHMARKS.md).

sparsa's change: the paper probes with the last query block only, which misses attention that only middle
queries pay -- measured on this project's reference model, variable tracking kept 0-42% of dense accuracy
(shared/METHODS.md). Here ``probe_blocks`` query blocks spread evenly over the sequence (always including the
last) are probed; ``probe_blocks=1`` is the paper's estimate. Patterns are per query head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._shapes import device_key, shape_constant
from ..ops.vertical_slash_blocks import vertical_slash_blocks
from ..pattern import BlockPattern, causal_block_mask
from ..registry import register
from .base import Selector, check_block, check_int
from .estimate import block_diagonal_scores, group_queries, pool_blocks, probe_scores
from .vertical_slash import check_slash_tiles, local_bands, slash_width, tiles_per_band


@register("prefill", "flexprefill")
@dataclass
class FlexPrefill(Selector):
    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 1024
    max_budget: int | None = None
    block: int = 128
    # Dense SDPA below this key length: measured against torch's default SDPA (cuDNN) on the H200,
    # estimation included (1.04x at 32K, 1.48x at 128K; BENCHMARKS.md, session 3: too close at 32K).
    dense_below: int = 131072
    probe_blocks: int = 4
    slash_count: str = "bands"
    slash_tiles: int | str = "weighted"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < float(self.gamma) <= 1.0:
            raise ValueError(f"flexprefill: gamma must be in (0, 1], got {self.gamma!r}")
        if not 0.0 <= float(self.tau) <= 1.0:
            raise ValueError(f"flexprefill: tau must be in [0, 1], got {self.tau!r}")
        check_int(self, "min_budget", minimum=1)
        if self.max_budget is not None:
            check_int(self, "max_budget", minimum=1)
        check_block(self)
        check_int(self, "probe_blocks")
        check_slash_tiles(self)
        if self.slash_count not in ("diagonals", "bands"):
            raise ValueError(f"flexprefill: slash_count must be 'diagonals' or 'bands', got {self.slash_count!r}")

    def select(self, q: Tensor, k: Tensor, *, layer_idx=None, key_padding_mask=None) -> BlockPattern:
        lq, lk, bs = q.shape[2], k.shape[2], self.block
        if lk <= max(2 * bs, -(-self.min_budget // bs) * bs):
            return BlockPattern.dense(lq, lk, block_q=bs, device=q.device)
        scale = 1.0 / math.sqrt(q.shape[-1])
        q_index = self._probe_index(lq, q.device)
        # Column scores [B, Hq, Lk]; diagonal scores by offset [B, Hq, Lk] ("diagonals"), or summed in bins of
        # `width` diagonals ("bands": half-bands for the weighted block-diagonal scores, whole bands otherwise).
        tokens = self.slash_count == "diagonals"
        width = 1 if tokens else slash_width(self.slash_tiles, bs)
        vertical, slash = probe_scores(q, k, q_index, scale, key_padding_mask, slash_block=width)
        mass = vertical.sum(-1, keepdim=True).clamp(min=1e-12)
        vertical, slash = vertical / mass, slash / mass  # each sums to 1 per head
        if self.slash_tiles == "weighted":  # one score per block-diagonal: the mass one of its tiles covers
            s_blocks = block_diagonal_scores(slash, width, lk, bs)
        else:
            s_blocks = pool_blocks(slash, lk, bs) if tokens else slash
        v_blocks = pool_blocks(vertical, lk, bs)
        pooled_k = _mean_pool(k, lk, bs)  # [B, Hkv, Kb, D]
        query_aware = self._js_distance(q, pooled_k, v_blocks, scale) < self.tau  # [B, Hq]
        n_v, n_s = self._budgets(vertical, torch.sort(slash if tokens else s_blocks, dim=-1, descending=True).values,
                                 query_aware)
        # The query-aware map is built for every head, not only once the device says that some head needs it:
        # asking is a host sync per layer (and a graph break under torch.compile). On layers with no query-aware
        # head the map is wasted: a sort of Qb x Kb entries per head (at 128K tokens a few percent of dense
        # attention in a one-off check on the H200, not in BENCHMARKS.md), memory a layer with one such head
        # needs anyway.
        # tau = 0 makes no head query-aware (the distance is >= 0): then it is skipped.
        extra = None
        if self.tau > 0:
            extra = self._query_aware_tiles(q, pooled_k, lk, scale) & query_aware[..., None, None]
        # Top key blocks and bands within each head's budgets, their tiles, the query-aware map, the sink and the
        # diagonal, compacted into index lists: two Triton launches on CUDA.
        # The nearest `block` diagonals are forced whole (the official code forces band 0 only, whose single tile
        # leaves a block's first queries without their neighbours when band 1 is not picked).
        num, idx = vertical_slash_blocks(v_blocks, s_blocks, n_v, n_s, q_len=lq, kv_len=lk, block=bs,
                                         forced_bands=local_bands(bs, bs, tiles_per_band(self)), extra_tiles=extra,
                                         band_tiles=tiles_per_band(self))
        return BlockPattern(num, idx, bs, bs, lq, lk)

    def _budgets(self, vertical: Tensor, s_sorted: Tensor, query_aware: Tensor) -> tuple[Tensor, Tensor]:
        """How many vertical blocks and slash bands each head keeps ``[B, Hq, 1]``: enough to cover ``gamma``
        of the probes' mass, within [min_budget, max_budget]; query-aware heads keep only the min_budget floor
        (their block map does the rest). ``s_sorted``: slash scores (per diagonal or per band, as
        ``slash_count``) in descending order."""
        bs = self.block
        kb = -(-vertical.shape[-1] // bs)
        lo, hi = max(self.min_budget // bs, 1), kb if self.max_budget is None else max(self.max_budget // bs, 1)
        n_v = (_cover(torch.sort(vertical, dim=-1, descending=True).values, self.gamma) // bs + 1).clamp(lo, hi)
        n_s = _cover(s_sorted, self.gamma)  # diagonals (or bands) covering gamma of the diagonal mass
        n_s = (n_s // bs + 1 if self.slash_count == "diagonals" else n_s).clamp(lo, hi)
        return n_v.masked_fill(query_aware, lo)[..., None], n_s.masked_fill(query_aware, lo)[..., None]

    @torch.compiler.disable  # host-side and data-dependent (unique): runs eagerly, never inside a compiled graph
    def _probe_index(self, lq: int, device) -> Tensor:
        """Local indices of the probe queries: ``probe_blocks`` blocks spread evenly, the last one included.
        Cached: every layer of a pass probes the same rows, and building them on the CPU costs a host-to-device
        copy (a sync on CUDA)."""
        def make():
            bs = min(self.block, lq)
            ends = torch.linspace(lq, bs, steps=self.probe_blocks).round().long().unique()
            return (ends[:, None] - bs + torch.arange(bs)[None, :]).flatten().to(device)

        return shape_constant(("flexprefill_probes", lq, self.block, self.probe_blocks, device_key(device)), make)

    def _js_distance(self, q, pooled_k, v_blocks, scale) -> Tensor:
        """sqrt(JS) between softmax(mean of the last query block . block-mean keys) and the probed vertical mass."""
        last = group_queries(q[:, :, max(q.shape[2] - self.block, 0):], pooled_k.shape[1]).float().mean(-2)
        logits = torch.einsum("bhgd,bhkd->bhgk", last, pooled_k).flatten(1, 2) * scale
        estimate = torch.softmax(logits, -1)
        target = v_blocks / v_blocks.sum(-1, keepdim=True).clamp(min=1e-12)
        log_mid = _log(0.5 * (estimate + target))
        js = 0.5 * (_kl(estimate, log_mid) + _kl(target, log_mid))
        return js.clamp(min=0).sqrt()

    def _query_aware_tiles(self, q, pooled_k, lk, scale) -> Tensor:
        """Block attention of pooled queries over pooled keys; the largest tiles over the whole map until
        ``gamma`` of its mass (each row's softmax sums to 1, so the map's mass is the number of rows)."""
        lq, bs = q.shape[2], self.block
        pooled_q = group_queries(_mean_pool(q, lq, bs), pooled_k.shape[1])  # [B, Hkv, G, Qb, D]
        logits = torch.einsum("bhgqd,bhkd->bhgqk", pooled_q, pooled_k).flatten(1, 2) * scale
        visible = causal_block_mask(lq, lk, bs, bs, q.device)
        hidden = shape_constant(("flexprefill_hidden", lq, lk, bs, device_key(q.device)), lambda: ~visible)
        probs = torch.softmax(logits.masked_fill(hidden, float("-inf")), -1)  # [B, Hq, Qb, Kb]
        vals, order = torch.sort(probs.flatten(-2), dim=-1, descending=True)
        keep = (torch.cumsum(vals, -1) - vals) < self.gamma * probs.shape[-2]
        picked = torch.zeros_like(keep).scatter_(-1, order, keep)
        return picked.view_as(probs) & visible


def _mean_pool(x: Tensor, length: int, block: int) -> Tensor:
    """Block means (float32) along the sequence dim of ``[B, H, L, D]``; the last partial block averages its
    real rows. Sums accumulate in float32 without a float32 copy of ``x`` (2 GB for q at 128K tokens)."""
    full = length // block
    parts = []
    if full:
        body = x[:, :, : full * block].reshape(*x.shape[:2], full, block, x.shape[-1])
        parts.append(body.sum(-2, dtype=torch.float32) / block)
    if full * block < length:
        parts.append(x[:, :, full * block:].sum(-2, keepdim=True, dtype=torch.float32) / (length - full * block))
    return torch.cat(parts, -2) if len(parts) > 1 else parts[0]


def _cover(vals: Tensor, gamma: float) -> Tensor:
    """Per row of scores sorted in descending order, how many of the first reach ``gamma`` of the row's mass."""
    return (torch.cumsum(vals, -1) <= gamma * vals.sum(-1, keepdim=True)).sum(-1) + 1


def _log(p: Tensor) -> Tensor:
    return torch.log(p.clamp(min=1e-12))


def _kl(p: Tensor, log_q: Tensor) -> Tensor:
    return (p * (_log(p) - log_q)).sum(-1)
