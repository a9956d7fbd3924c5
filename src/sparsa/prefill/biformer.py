"""BiFormer's bi-level routing attention (BRA): route each region to its top-k regions, then attend token by token.

Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention" (CVPR 2023), rayleizhu/BiFormer.
A region's descriptor is the mean of its queries (``q_r``) and of its keys (``k_r``); the region-to-region
routing scores are ``A_r = q_r k_r^T``; each region keeps its ``topk`` highest-scoring regions and its queries
attend, token by token, to every key of those regions. Here a region is a tile of a :class:`~sparsa.BlockPattern`.

Two forms:

- :class:`BiFormer` (``"biformer"``): a causal 1-D prefill selector for language models. Regions are blocks of
  ``block`` consecutive tokens (query blocks on the query side, key blocks on the key side); each query block
  keeps its ``topk`` best causally visible key blocks, plus its diagonal block so that no query is left without
  a key. Default ``topk=16`` blocks of ``block=128`` tokens: the paper's main stage (stage 3, most of the
  layers) routes to 16 regions. Why 128 tokens and not 64: FlexAttention's kernel runs 64-token sparse blocks at
  about half its dense efficiency on the H200 (a profile at 8K: 0.81 ms of attention at density 0.28 against
  1.49 ms dense), and 128-token blocks made the whole call 1.2-1.6x faster at the same accuracy (BENCHMARKS.md,
  session 5). Why 16 and not 8 blocks of 128 (the same 1K routed keys as 16 of 64, session 5's default): on
  ref-small stage 6, which solves variable tracking at 32K, 8 blocks kept 98.9% of dense over the NIAH family and
  vt at 8K-32K (vt at 32K: 88%), 12 kept 99.3%, 16 kept 99.5% (vt at 32K: 92%) at density 0.143 at 32K, for
  5.2x SDPA flash at 32K and 17.9x at 128K against 6.8x and 22.3x with 8 (BENCHMARKS.md, session 6).
- :func:`biformer_attention_2d`: the paper's non-causal 2-D form on a row-major ``height x width`` token grid,
  ``n_win x n_win`` regions, run as one block-sparse kernel call in region-major token order.

Scoring of the 1-D selector (``scoring``): ``"mean"`` is the paper's routing above. ``"bound"`` (the default)
keeps BiFormer's structure (per query block, top-k key blocks plus the diagonal) but scores a pair of blocks with
Quest's upper bound (Tang et al., ICML 2024): each key block is summarised by the elementwise max and min of its
keys, and a query block by ``query_samples`` of its queries (every query head of the KV group, max over them). A
single key that one query needs (a variable's definition) raises its block's bound, where the two block means
dilute it ``block``-fold on each side. The defaults also compute ``sink_blocks=1`` first and ``local_blocks=2``
preceding key blocks outside the routed budget: a causal language model's attention sink and local context, which
an image model's routing never needed. Measured on ref-small (H200, the NIAH family and variable tracking at
8K-32K, 20 samples per cell, the same samples as dense; BENCHMARKS.md, session 5), with 16 blocks of 64 tokens:
bound scoring with the sink and local blocks kept 100.4% of dense at density 0.074 at 32K; the paper's routing
(``scoring="mean", sink_blocks=0, local_blocks=0``) kept 89.9% at 0.062 (vt: 0.76 / 0.69 / 0.26 of dense at 8K /
16K / 32K). 8 blocks of 128 kept 100.2% at 0.086 (the NIAH part of these is an upper bound: measured before the
prompts ended with the answer's leading space; with them, and the stage-6 model, 98.9%, above). The bound costs
more to estimate than the means (32K, 64-token blocks: 4.2x SDPA flash against 6.0x), which the larger blocks win
back. The bound is only as tight as the keys are concentrated: for keys of large isotropic noise every block's
bound is alike. The cost is a matmul over the doubled head dim of the sampled queries (bf16 on the GPU), chunked
over query blocks so that memory stays linear in length.

Causality of the 1-D selector: a block descriptor is the mean over the whole block, so the routing of query
block ``r`` also looks at the later queries of block ``r`` (and the diagonal key block at its later keys). This
is a block-level routing decision only (the kernel still masks every later key), as in other block-sparse
prefill selectors; it is not an autoregressive training-time rule.

GQA: one pattern per KV head. The group's query descriptors are averaged before routing, which equals averaging
the group's routing scores (the score is linear in ``q_r``). It keeps the budget at ``topk`` key blocks per KV
head (the union of per-query-head top-k sets could reach ``group * topk`` blocks) and every key block the kernel
loads serves the whole group; it also matches the 2-D routing, which the paper shares across all heads.

Padding (``key_padding_mask [B, Lk]``, True = real token, e.g. left padding in a batch): block descriptors
average real tokens only, key blocks made only of padding are never routed to (only the forced diagonal block
may be padding; the kernel masks padded keys), and the pattern becomes one per sequence. A block without
padding keeps exactly its unpadded descriptor, so a sequence without padding gets its unpadded pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.topk_blocks import topk_blocks
from ..pattern import BlockPattern
from ..registry import register
from .base import Selector, check_block, check_int, check_samples
from .estimate import sampled_bounds


def block_means(x: Tensor, block: int) -> Tensor:
    """Mean of each run of ``block`` positions along dim 2 (the last one may be shorter): ``[B, H, nb, D]`` float32.

    Sums in float32 without an up-cast copy of ``x`` and without padding it.
    """
    batch, heads, length, dim = x.shape
    full, tail = divmod(length, block)
    parts = []
    if full:
        parts.append(x[:, :, : full * block].reshape(batch, heads, full, block, dim).sum(3, dtype=torch.float32)
                     / block)
    if tail:
        parts.append(x[:, :, full * block:].sum(2, keepdim=True, dtype=torch.float32) / tail)
    return parts[0] if len(parts) == 1 else torch.cat(parts, 2)


def masked_block_means(x: Tensor, block: int, real: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`block_means` over the real positions only (``real [B, L]`` bool): ``([B, H, nb, D] float32, counts
    [B, nb])``. A block without real positions has mean 0; a block without padding gets exactly
    :func:`block_means`' value."""
    batch, heads, length, dim = x.shape
    full, tail = divmod(length, block)
    xm = x.masked_fill(~real[:, None, :, None], 0)
    means, counts = [], []
    for start, n_blocks, size in ((0, full, block), (full * block, 1 if tail else 0, tail)):
        if not n_blocks:
            continue
        end = start + n_blocks * size
        s = xm[:, :, start:end].reshape(batch, heads, n_blocks, size, dim).sum(3, dtype=torch.float32)
        n = real[:, start:end].reshape(batch, n_blocks, size).sum(-1)  # [B, nb]
        # dividing by the python int where the block is all real keeps block_means' rounding exactly
        n_ = n[:, None, :, None]
        means.append(torch.where(n_ == size, s / size, s / n_.clamp(min=1)))
        counts.append(n)
    if len(means) == 1:
        return means[0], counts[0]
    return torch.cat(means, 2), torch.cat(counts, 1)


def group_mean(x: Tensor, num_kv_heads: int) -> Tensor:
    """Average the query heads of each GQA group: ``[B, Hq, ...] -> [B, Hkv, ...]``."""
    batch, hq = x.shape[:2]
    if hq % num_kv_heads:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the key/value heads ({num_kv_heads})")
    return x.view(batch, num_kv_heads, hq // num_kv_heads, *x.shape[2:]).mean(2)


@register("prefill", "biformer")
@dataclass
class BiFormer(Selector):
    """Causal 1-D bi-level routing: per query block and KV head, the ``topk`` best-scoring key blocks (plus the
    diagonal block and the forced sink and local blocks); ``scoring="mean", sink_blocks=0, local_blocks=0`` is the
    paper's ``mean(q) . mean(k)`` routing."""

    topk: int = 16
    block: int = 128
    # Dense SDPA below this key length, where torch's fastest SDPA (cuDNN, ~1.7-2x flash on the H200) may still win.
    # Estimation included (Triton: Quest bounds and top-k in three launches), attention in sparsa's Triton kernel,
    # against SDPA flash / cuDNN at the defaults: 1.8-2.2x / 0.9-1.1x at 8K over six processes (a tie with cuDNN,
    # so 8K stays dense), 7.3x at 32K, 26x at 128K (eager; BENCHMARKS.md, session 8).
    dense_below: int = 16384
    #: ``"bound"`` (Quest upper bound of each key block against sampled queries, the default) or ``"mean"``
    #: (the paper's mean-pooled block descriptors); see the module docstring
    scoring: str = "bound"
    #: with ``scoring="bound"``: queries per query block that score it (evenly spaced, the block's last included)
    query_samples: int = 16
    #: key blocks always computed on top of the ``topk`` routed ones: ``sink_blocks`` at the start and
    #: ``local_blocks`` before the diagonal (the paper has neither: 0, 0). Forced blocks are not routed to, so
    #: they do not use the budget; see the module docstring for the defaults.
    sink_blocks: int = 1
    local_blocks: int = 2
    #: routed blocks as a share of the key blocks, when that is more than ``topk``: the budget is
    #: ``max(topk, ceil(topk_fraction * Lk / block))``, so it grows with the context (0, the default: ``topk``
    #: at every length). A fixed ``topk`` must pick the same few blocks out of ever more candidates; on ref-small
    #: 8 blocks of 128 kept 100.0% / 99.6% of dense at 8K / 16K but 97.2% at 32K, where 16 kept 97.8%
    #: (BENCHMARKS.md, session 6); ``topk=8, topk_fraction=1/16`` gives 8 blocks to 16K and 16 at 32K: 99.1%
    #: over 8K-32K and 1.57x SDPA flash at 8K with ``cuda_graph=True``, but its 64 blocks at 128K leave 8.5x
    #: SDPA flash there, against 18.4x with 16 (BENCHMARKS.md, session 7), so it is not a default.
    topk_fraction: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "topk")
        if not isinstance(self.topk_fraction, (int, float)) or isinstance(self.topk_fraction, bool) \
                or not 0 <= self.topk_fraction <= 1:
            raise ValueError(f"biformer: topk_fraction must be a number in [0, 1], got {self.topk_fraction!r}")
        check_block(self)
        if self.scoring not in ("bound", "mean"):
            raise ValueError(f"biformer: scoring must be 'bound' or 'mean', got {self.scoring!r}")
        check_samples(self)
        check_int(self, "sink_blocks", minimum=0)
        check_int(self, "local_blocks", minimum=0)

    def routing_scores(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``[B, Hkv, Qb, Kb]`` float32 routing scores (before causal masking).

        ``key_padding_mask [B, Lk]`` (True = real token): descriptors average real tokens only (queries are the
        last ``Lq`` positions of the mask) and key blocks made only of padding score ``-inf``.
        """
        _check_qk(q, k)
        if self.scoring == "bound":
            return self._bound_scores(q, k, key_padding_mask)
        if key_padding_mask is None:
            q_r = group_mean(block_means(q, self.block), k.shape[1])  # [B, Hkv, Qb, D]
            k_r = block_means(k, self.block)  # [B, Hkv, Kb, D]
            return torch.einsum("bhqd,bhkd->bhqk", q_r, k_r)
        real = key_padding_mask.to(device=k.device, dtype=torch.bool)
        q_r, _ = masked_block_means(q, self.block, real[:, k.shape[2] - q.shape[2]:])
        k_r, k_count = masked_block_means(k, self.block, real)
        scores = torch.einsum("bhqd,bhkd->bhqk", group_mean(q_r, k.shape[1]), k_r)
        return scores.masked_fill((k_count == 0)[:, None, None, :], float("-inf"))

    def _bound_scores(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """``[B, Hkv, Qb, Kb]``: per query block, the max over its sampled queries (all heads of the KV group) of
        each key block's Quest bound; key blocks made only of padding, and padded sampled queries, score -inf."""
        real = None if key_padding_mask is None else key_padding_mask.to(device=k.device, dtype=torch.bool)
        return sampled_bounds(q, k, self.block, self.query_samples, key_real=real,
                              query_real=None if real is None else real[:, k.shape[2] - q.shape[2]:])

    def select(self, q, k, *, layer_idx=None, key_padding_mask=None):
        scores = self.routing_scores(q, k, key_padding_mask)
        lq, lk = q.shape[2], k.shape[2]
        # routed blocks come on top of the forced sink and local ones; one Triton launch on CUDA
        num, idx = topk_blocks(scores, self.budget(lk), q_len=lq, kv_len=lk, block=self.block,
                               sink=self.sink_blocks, local=self.local_blocks)
        return BlockPattern(num, idx, self.block, self.block, lq, lk)

    def budget(self, kv_len: int) -> int:
        """Routed key blocks per query block at this key length: ``topk``, or more with ``topk_fraction``."""
        return max(self.topk, math.ceil(self.topk_fraction * -(-kv_len // self.block)))


def _check_qk(q, k):
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, L, D], got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"the number of query heads ({q.shape[1]}) must be a multiple of the key/value heads "
                         f"({k.shape[1]})")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q has more positions ({q.shape[2]}) than k ({k.shape[2]})")


# ------------------------------------------------------------------------------------------------ 2-D form
def to_region_major(x: Tensor, height: int, width: int, n_win: int) -> Tensor:
    """Row-major ``[B, H, height*width, D]`` tokens to region-major order (regions row-major, then the pixels
    of each region row-major), as BiFormer's ``n (j h) (i w) c -> n (j i) (h w) c``."""
    batch, heads, _, dim = x.shape
    rh, rw = height // n_win, width // n_win
    x = x.reshape(batch, heads, n_win, rh, n_win, rw, dim).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(batch, heads, height * width, dim)


def from_region_major(x: Tensor, height: int, width: int, n_win: int) -> Tensor:
    """Inverse of :func:`to_region_major`."""
    batch, heads, _, dim = x.shape
    rh, rw = height // n_win, width // n_win
    x = x.reshape(batch, heads, n_win, n_win, rh, rw, dim).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(batch, heads, height * width, dim)


def routing_pattern_2d(q: Tensor, k: Tensor, height: int, width: int, n_win: int, topk: int, *,
                       per_head: bool = False) -> BlockPattern:
    """The region-level routing of BRA as a non-causal pattern over region-major tokens (one tile = one region).

    ``q``/``k`` are row-major ``[B, H, height*width, D]``. Routing is shared by all heads (the paper routes with
    the full ``qk_dim`` descriptor, i.e. the sum of the per-head scores); ``per_head=True`` routes each KV head
    on its own (its query group averaged).
    """
    _check_2d(q, k, height, width, n_win, topk)
    region = (height // n_win) * (width // n_win)
    q_r = block_means(to_region_major(q, height, width, n_win), region)  # [B, Hq, S^2, D]
    k_r = block_means(to_region_major(k, height, width, n_win), region)  # [B, Hkv, S^2, D]
    q_r = group_mean(q_r, k.shape[1])
    scores = torch.einsum("bhqd,bhkd->bhqk", q_r, k_r)  # [B, Hkv, S^2, S^2]
    if not per_head:
        scores = scores.sum(1, keepdim=True)
    n = height * width
    return BlockPattern.from_block_scores(scores, q_len=n, kv_len=n, block_q=region, block_k=region, topk=topk,
                                          causal=False, keep_diagonal=False, keep_first=False)


def biformer_attention_2d(q: Tensor, k: Tensor, v: Tensor, height: int, width: int, n_win: int, topk: int,
                          backend: str = "auto", *, scale: float | None = None, per_head: bool = False,
                          return_pattern: bool = False):
    """BiFormer's bi-level routing attention on a row-major ``height x width`` grid (non-causal).

    Args:
        q: ``[B, Hq, height*width, D]``; k, v: ``[B, Hkv, height*width, D]`` (GQA allowed, never repeated).
        n_win: regions per side; ``height`` and ``width`` must be multiples of it.
        topk: regions each region attends to, ``1 <= topk <= n_win**2`` (``n_win**2``: full attention).
        backend: as :func:`sparsa.ops.block_sparse_attention`. ``"auto"`` takes the reference backend when a
            region holds a number of tokens the compiled kernel cannot tile (not a power of two >= 16 nor a
            multiple of 128).
        per_head: route each KV head separately instead of once for all heads (the paper shares the routing).
        return_pattern: also return the :class:`~sparsa.BlockPattern` (region-major order).

    Returns:
        ``out [B, Hq, height*width, Dv]`` in row-major order (and the pattern).
    """
    from ..ops import block_sparse_attention

    if not isinstance(v, Tensor) or v.dim() != 4:
        raise ValueError("v must be a 4-D tensor [B, H, L, D]")
    pattern = routing_pattern_2d(q, k, height, width, n_win, topk, per_head=per_head)
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on [B, Hkv, L]")
    region = pattern.block_q
    if backend == "auto" and not _kernel_friendly(region):
        backend = "reference"
    qp, kp, vp = (to_region_major(t, height, width, n_win) for t in (q, k, v))
    out = block_sparse_attention(qp, kp, vp, pattern, causal=False, scale=scale, backend=backend, validate=False)
    out = from_region_major(out, height, width, n_win)
    return (out, pattern) if return_pattern else out


def _kernel_friendly(block: int) -> bool:
    return (block >= 16 and block & (block - 1) == 0) or block % 128 == 0


def _check_2d(q, k, height, width, n_win, topk):
    for name, value in (("height", height), ("width", width), ("n_win", n_win), ("topk", topk)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"biformer_attention_2d: {name} must be a positive int, got {value!r}")
    if height % n_win or width % n_win:
        raise ValueError(f"biformer_attention_2d: height ({height}) and width ({width}) must be multiples of "
                         f"n_win ({n_win})")
    if topk > n_win * n_win:
        raise ValueError(f"biformer_attention_2d: topk ({topk}) must be <= n_win**2 ({n_win * n_win}) regions")
    _check_qk(q, k)
    n = height * width
    if q.shape[2] != n or k.shape[2] != n:
        raise ValueError(f"biformer_attention_2d: q and k must hold height*width = {n} tokens, got {q.shape[2]} "
                         f"and {k.shape[2]}")


__all__ = ["BiFormer", "biformer_attention_2d", "routing_pattern_2d", "to_region_major", "from_region_major",
           "block_means", "masked_block_means"]
