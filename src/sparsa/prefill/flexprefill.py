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

from ..pattern import BlockPattern, causal_block_mask
from ..registry import register
from .base import Selector, check_block, check_int
from .estimate import band_tiles, force_sink_and_diagonal, group_queries, pool_blocks, probe_scores, top_indices


@register("prefill", "flexprefill")
@dataclass
class FlexPrefill(Selector):
    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 1024
    max_budget: int | None = None
    block: int = 128
    # Dense SDPA below this key length: measured against torch's default SDPA (cuDNN) on the H200,
    # estimation included (0.88x at 32K, 1.34x at 128K; BENCHMARKS.md, 2026-11-29).
    dense_below: int = 131072
    probe_blocks: int = 4

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

    def select(self, q: Tensor, k: Tensor, *, layer_idx=None, key_padding_mask=None) -> BlockPattern:
        lq, lk, bs = q.shape[2], k.shape[2], self.block
        if lk <= max(2 * bs, -(-self.min_budget // bs) * bs):
            return BlockPattern.dense(lq, lk, block_q=bs, device=q.device)
        scale = 1.0 / math.sqrt(q.shape[-1])
        q_index = self._probe_index(lq, q.device)
        # Column scores [B, Hq, Lk]; diagonal scores summed in bands of `block` diagonals [B, Hq, Kb].
        vertical, s_blocks = probe_scores(q, k, q_index, scale, key_padding_mask, slash_block=bs)
        mass = vertical.sum(-1, keepdim=True).clamp(min=1e-12)
        vertical, s_blocks = vertical / mass, s_blocks / mass  # each sums to 1 per head
        kb = -(-lk // bs)
        v_blocks = pool_blocks(vertical, lk, bs)
        lo, hi = max(self.min_budget // bs, 1), kb if self.max_budget is None else max(self.max_budget // bs, 1)
        n_v = (_cover(vertical, self.gamma) // bs + 1).clamp(lo, hi)
        n_s = _cover(s_blocks, self.gamma).clamp(lo, hi)  # bands covering gamma of the diagonal mass
        vs_tiles = band_tiles(top_indices(v_blocks, n_v), top_indices(s_blocks, n_s), lq, lk, bs)
        query_aware = self._js_distance(q, k, v_blocks, scale, lq, lk) < self.tau  # [B, Hq]
        # The query-aware map costs a sort of Qb x Kb entries per head. Up to 2**16 tiles (32K tokens at 128-token
        # blocks) it is cheaper to build it for every head than to ask the device whether any head needs it
        # (a host sync); above that, ask.
        if -(-lq // bs) * kb <= 1 << 16 or bool(query_aware.any()):
            floor = band_tiles(top_indices(v_blocks, lo), top_indices(s_blocks, lo), lq, lk, bs)
            qa_tiles = floor | self._query_aware_tiles(q, k, scale)
            vs_tiles = torch.where(query_aware[..., None, None], qa_tiles, vs_tiles)
        tiles = force_sink_and_diagonal(vs_tiles, lq, lk, bs, bs)
        return BlockPattern.from_block_mask(tiles, q_len=lq, kv_len=lk, block_q=bs)

    def _probe_index(self, lq: int, device) -> Tensor:
        """Local indices of the probe queries: ``probe_blocks`` blocks spread evenly, the last one included.
        Cached per length and device: every layer of a pass probes the same rows, and building them on the CPU
        costs a host-to-device copy (a sync on CUDA)."""
        cache = self.__dict__.setdefault("_probe_cache", {})
        key = (lq, str(device))
        if key not in cache:
            bs = min(self.block, lq)
            ends = torch.linspace(lq, bs, steps=self.probe_blocks).round().long().unique()
            cache.clear()
            cache[key] = (ends[:, None] - bs + torch.arange(bs)[None, :]).flatten().to(device)
        return cache[key]

    def _js_distance(self, q, k, v_blocks, scale, lq, lk) -> Tensor:
        """sqrt(JS) between softmax(mean of the last query block . block-mean keys) and the probed vertical mass."""
        bs = self.block
        last = group_queries(q[:, :, max(lq - bs, 0):], k.shape[1]).float().mean(-2)  # [B, Hkv, G, D]
        pooled_k = _mean_pool(k, lk, bs)  # [B, Hkv, Kb, D]
        logits = torch.einsum("bhgd,bhkd->bhgk", last, pooled_k).flatten(1, 2) * scale
        estimate = torch.softmax(logits, -1)
        target = v_blocks / v_blocks.sum(-1, keepdim=True).clamp(min=1e-12)
        mid = 0.5 * (estimate + target)
        js = 0.5 * (_kl(estimate, mid) + _kl(target, mid))
        return js.clamp(min=0).sqrt()

    def _query_aware_tiles(self, q, k, scale) -> Tensor:
        """Block attention of pooled queries over pooled keys; the largest tiles over the whole map until
        ``gamma`` of its mass (each row's softmax sums to 1, so the map's mass is the number of rows)."""
        lq, lk, bs = q.shape[2], k.shape[2], self.block
        pooled_q = group_queries(_mean_pool(q, lq, bs), k.shape[1])  # [B, Hkv, G, Qb, D]
        pooled_k = _mean_pool(k, lk, bs)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", pooled_q, pooled_k).flatten(1, 2) * scale
        visible = causal_block_mask(lq, lk, bs, bs, q.device)
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)  # [B, Hq, Qb, Kb]
        flat = probs.flatten(-2)
        vals, order = torch.sort(flat, dim=-1, descending=True)
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


def _cover(scores: Tensor, gamma: float) -> Tensor:
    """Per row, how many of the highest entries reach ``gamma`` of the row's mass."""
    vals = torch.sort(scores, dim=-1, descending=True).values
    return (torch.cumsum(vals, -1) <= gamma * vals.sum(-1, keepdim=True)).sum(-1) + 1


def _kl(p: Tensor, q: Tensor) -> Tensor:
    return (p * (torch.log(p.clamp(min=1e-12)) - torch.log(q.clamp(min=1e-12)))).sum(-1)
