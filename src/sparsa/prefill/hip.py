"""HiP attention: a coarse-to-fine tree search for each query block's top-k key blocks, O(N log N).

Lee et al., "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework With Hierarchically
Pruned Attention" (ICLR 2025; DeepAuto-AI/hip-attention). HiP assumes *attention locality*: keys next to each
other get similar scores, so a span of keys can be judged by one representative key. Per query block:

1. the searchable keys are split into ``k`` contiguous nodes;
2. every node is split in two; each child is scored by its representative key -- the child's centre token,
   as in the paper -- with the score reduced over the query block's queries by max; the ``k`` best children
   (over all children of the row) are kept;
3. step 2 repeats until the nodes are single blocks (``ceil(log2(n / k))`` levels, each costing
   ``O(k)`` key loads per query block: ``O(N log N)`` in all);
4. the ``k`` selected blocks, the sink block(s) and the local window blocks form the pattern.

Defaults: ``mask_k = 512`` keys per query and ``sliding_window = 128`` (HiP v1.0), ``sink = 4`` tokens (the
``sink_token_size`` of the v1.1 ``hip_attention`` entry point). Granularity mapping onto sparsa's square tiles
(``block``, default 64):

- HiP builds its mask for query blocks of ``b_q = 32`` queries over key groups of ``b_k = 1-2`` tokens;
  sparsa's kernels compute ``block x block`` tiles, so the tree search here stops at key *blocks*: ``mask_k``
  tokens become ``ceil(mask_k / block)`` selected blocks (8 at the defaults). A leaf block is still scored by its
  centre token, like every node above it.
- ``block = 64`` rather than the kernels' usual 128: the finest block the kernels run efficiently, the closest
  to HiP's 32-query blocks and 1-2 token leaves, and it leaves the search 8 leaves at ``mask_k = 512`` (4 at
  128, where the last levels of the search would mostly be decided by the window).
- ``sliding_window`` tokens become the diagonal block plus the ``ceil(sliding_window / block)`` blocks before
  it (a superset of every query's token window); ``sink`` tokens become the first ``ceil(sink / block)``
  blocks. Sinks and window are excluded from the search range (as HiP excludes the window), so the searched
  blocks come on top of them; with ``mask_k`` at least the key length the pattern is dense causal.
- Query reduction: HiP takes the max over a query block's queries, which its code subsamples with a query
  stride (v1.2's scan stages: 64-query blocks at stride 4, i.e. 16 queries); here the max is over
  ``query_samples = 16`` evenly spaced queries of the block, always including its last query (the one that
  sees every searched block; query/key pairs that are not causally visible are masked out of the score).

GQA: one pattern per KV head; a group's query heads are reduced by max together with the block's queries
(they read the same keys, so their union of interest is what one KV head's blocks must serve). The keys are
gathered once per KV head, never repeated, and the pattern is a quarter (at 4 query heads per KV head) of a
per-query-head one.

Deviations: the search stops at blocks, not HiP's 1-2 token leaves, and the mask is block-granular; HiP's
random/first-token sampling variants and SparQ low-rank scoring are not implemented (the paper's centre token
is); no HiP-specific dense layers (``dense_below`` still applies). Estimation is plain PyTorch, batched over
batch, heads and query blocks; one level holds ``O(B * Lq/block * k * (Hq * samples + Hkv * D))`` numbers.

Padding (``key_padding_mask [B, Lk]``, True = real token, e.g. left padding in a batch): a node is represented
by the centre of its real keys (the span from its first to its last real key), a node made only of padding is
dead (never searched further, never picked), and padded sampled queries do not score. The sink and window
blocks stay forced even where they are padding (the kernel masks padded keys); the pattern becomes one per
sequence. Without padding every node keeps its centre token, so an unpadded sequence gets its unpadded pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..pattern import BlockPattern, last_visible_block
from ..registry import register
from .base import Selector, check_block, check_int, check_samples
from .estimate import sample_rows


@register("prefill", "hip")
@dataclass
class HiP(Selector):
    #: keys per query selected by the tree search, in tokens (HiP's ``mask_k``); ``ceil(mask_k / block)`` blocks
    mask_k: int = 512
    #: local window in tokens, always computed (with the diagonal block)
    sliding_window: int = 128
    #: attention-sink tokens at the start, always computed (key block 0 when ``sink <= block``)
    sink: int = 4
    block: int = 64
    # Dense SDPA below this key length: measured against torch's default SDPA (cuDNN) on the H200,
    # estimation included (0.23x at 8K, 2.53x at 32K; BENCHMARKS.md, 2026-11-29).
    dense_below: int = 32768
    #: queries per query block whose max scores a node (evenly spaced, the block's last query included)
    query_samples: int = 16

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "mask_k")
        check_int(self, "sliding_window", minimum=0)
        check_int(self, "sink", minimum=0)
        check_block(self)
        check_samples(self)

    @property
    def topk_blocks(self) -> int:
        return -(-self.mask_k // self.block)

    def select(self, q: Tensor, k: Tensor, *, layer_idx=None, key_padding_mask=None) -> BlockPattern:
        batch, hq, lq, dim = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        if hkv == 0 or hq % hkv:
            raise ValueError(f"{self.name}: query heads ({hq}) must be a multiple of key/value heads ({hkv})")
        if lq > lk:
            raise ValueError(f"{self.name}: q has more positions ({lq}) than k ({lk})")
        bs, dev = self.block, q.device
        qb = -(-lq // bs)
        topk = self.topk_blocks
        win = -(-self.sliding_window // bs)
        n_sink = -(-self.sink // bs)

        last = last_visible_block(lq, lk, bs, bs, dev)  # [Qb] the diagonal block of each query block
        local_lo = (last - win).clamp(min=0)  # first local-window block
        lo0 = torch.full_like(last, n_sink)
        hi0 = torch.maximum(local_lo, lo0)  # search range [n_sink, local_lo), empty if none
        n = hi0 - lo0

        # Initial nodes: the search range cut into topk contiguous pieces (empty pieces when it is shorter).
        cuts = lo0[:, None] + (n[:, None] * torch.arange(topk + 1, device=dev)) // topk  # [Qb, topk+1]
        lo = cuts[:, :-1].expand(batch, hkv, qb, topk)
        hi = cuts[:, 1:].expand(batch, hkv, qb, topk)

        # Levels: enough halvings to bring the largest initial node (of the last row, the longest range) to 1.
        n_max = max(0, max((lk - 1) // bs - win, 0) - n_sink)
        levels = math.ceil(math.log2(-(-n_max // topk))) if n_max > topk else 0
        real = None if key_padding_mask is None else key_padding_mask.to(device=dev, dtype=torch.bool)
        if levels:
            q_rep, q_pos = self._query_samples(q, hkv, lk)
            visible_q = q_pos[None, None, :, None, None, :]  # [1, 1, Qb, 1, 1, S]
            if real is not None:  # positions of padded sampled queries never see a key
                visible_q = torch.where(real[:, q_pos][:, None, :, None, None, :], visible_q, -1)
                next_real, prev_real = _real_neighbours(real)
        for _ in range(levels):
            mid = (lo + hi) // 2
            c_lo = torch.stack((lo, mid), -1).flatten(-2)  # [B, Hkv, Qb, 2k]
            c_hi = torch.stack((mid, hi), -1).flatten(-2)
            alive = c_hi > c_lo
            if real is None:
                centre = torch.where(alive, (c_lo + c_hi) * bs // 2, 0)  # the child's centre token
            else:  # the centre of the child's real keys; a child made only of padding is dead
                centre, has_real = _real_centre(c_lo * bs, c_hi * bs, next_real, prev_real)
                alive = alive & has_real
                centre = torch.where(alive, centre, 0)
            keys = torch.gather(k, 2, centre.reshape(batch, hkv, -1, 1).expand(-1, -1, -1, dim))
            keys = keys.view(batch, hkv, qb, 2 * topk, dim).float()
            s = torch.einsum("bhgrsd,bhrcd->bhrcgs", q_rep, keys)  # [B, Hkv, Qb, 2k, G, S]
            visible = visible_q >= centre[..., None, None]
            s = s.masked_fill(~visible, float("-inf")).amax((-2, -1))
            s = s.masked_fill(~alive, float("-inf"))
            best = torch.topk(s, topk, dim=-1).indices
            lo, hi = torch.gather(c_lo, -1, best), torch.gather(c_hi, -1, best)
        picked = hi > lo  # single blocks (or empty pieces) by now
        if real is not None:  # a block made only of padding is never picked (dead nodes can fill a short top-k)
            kb = -(-lk // bs)
            block_real = torch.nn.functional.pad(real, (0, kb * bs - lk)).view(batch, 1, 1, kb, bs).any(-1)
            picked = picked & torch.gather(block_real.expand(batch, hkv, qb, kb), -1, lo.clamp(max=kb - 1))

        sink_idx = torch.arange(n_sink, device=dev).expand(qb, n_sink)
        sink_ok = sink_idx < local_lo[:, None]
        local_idx = local_lo[:, None] + torch.arange(win + 1, device=dev)
        local_ok = local_idx <= last[:, None]
        shape = (batch, hkv, qb)
        idx = torch.cat((sink_idx.expand(*shape, n_sink), lo, local_idx.expand(*shape, win + 1)), -1)
        ok = torch.cat((sink_ok.expand(*shape, n_sink), picked, local_ok.expand(*shape, win + 1)), -1)
        return BlockPattern.from_index_lists(idx, ok, q_len=lq, kv_len=lk, block=bs)

    def _query_samples(self, q: Tensor, hkv: int, lk: int) -> tuple[Tensor, Tensor]:
        """``[B, Hkv, G, Qb, S, D]`` float32 sampled queries and their positions ``[Qb, S]``."""
        batch, hq, lq, dim = q.shape
        samples = self.query_samples
        rows = sample_rows(lq, self.block, samples, q.device)  # [Qb, S]
        qb = rows.shape[0]
        rep = q.index_select(2, rows.flatten()).float()
        return rep.view(batch, hkv, hq // hkv, qb, samples, dim), rows + (lk - lq)


def _real_neighbours(real: Tensor) -> tuple[Tensor, Tensor]:
    """``real [B, L]`` bool: per position, the first real position at or after it (``L`` if none) and the last
    one at or before it (``-1`` if none), ``[B, L]`` long each."""
    length = real.shape[-1]
    pos = torch.arange(length, device=real.device).expand_as(real)
    next_real = torch.where(real, pos, length).flip(-1).cummin(-1).values.flip(-1)
    prev_real = torch.where(real, pos, -1).cummax(-1).values
    return next_real, prev_real


def _real_centre(start: Tensor, end: Tensor, next_real: Tensor, prev_real: Tensor) -> tuple[Tensor, Tensor]:
    """Representative key of token spans ``[start, end)`` (``[B, ...]``, non-empty or ignored): the centre of the
    span's real keys (the first to the last real key; the next real key when the centre is a padded hole), and
    whether the span holds a real key. Without padding it is the span's centre token, ``(start + end) // 2``."""
    batch, length = next_real.shape
    flat = lambda t: t.reshape(batch, -1).clamp(0, length - 1)  # noqa: E731
    first = torch.gather(next_real, 1, flat(start)).view_as(start)
    last = torch.gather(prev_real, 1, flat(end - 1)).view_as(end)
    has_real = (first <= last) & (end > start)
    centre = torch.gather(next_real, 1, flat((first + last + 1) // 2)).view_as(start)
    return centre, has_real
