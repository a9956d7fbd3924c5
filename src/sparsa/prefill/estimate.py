"""Shared estimation steps for dynamic selectors (plain PyTorch, batched over batch and heads).

- ``probe_scores``: column sums ("vertical" lines) and diagonal sums ("slash" lines) of a few probe queries'
  causal softmax attention over all keys (``sparsa.ops.vertical_slash``: Triton on CUDA, PyTorch reference);
- ``block_diagonal_scores``: the slash mass one tile on each block-diagonal covers, from binned diagonal sums;
- ``band_tiles`` / ``block_tiles``: the tiles that selected key blocks and diagonal bands touch, as a
  ``[B, H, Qb, Kb]`` map;
- ``sampled_bounds``: Quest bounds of key blocks against sampled queries, per query block
  (``sparsa.ops.quest``: Triton on CUDA, PyTorch reference).

Memory is linear in the key length (probe rows x keys) plus block-level maps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._shapes import device_key, shape_constant
from ..ops.quest import block_bounds  # noqa: F401 -- moved to sparsa.ops.quest; imported from here too
from ..pattern import arange, causal_block_mask, last_visible_block


def group_queries(q: Tensor, num_kv_heads: int) -> Tensor:
    """``[B, Hq, L, D] -> [B, Hkv, G, L, D]`` (a view): the query heads of each KV group side by side."""
    b, hq, l, d = q.shape
    return q.view(b, num_kv_heads, hq // num_kv_heads, l, d)


def probe_scores(q: Tensor, k: Tensor, q_index: Tensor, scale: float,
                 key_padding_mask: Tensor | None = None, slash_block: int = 1) -> tuple[Tensor, Tensor]:
    """Vertical scores ``[B, Hq, Lk]`` and slash scores ``[B, Hq, ceil(Lk / slash_block)]`` (diagonals summed in
    bands of ``slash_block``) of the queries at local indices ``q_index``."""
    from ..ops.vertical_slash import vertical_slash_scores

    q_pos = q_index + (k.shape[2] - q.shape[2])
    return vertical_slash_scores(q[:, :, q_index], k, q_pos, scale, key_padding_mask=key_padding_mask,
                                 slash_block=slash_block)


def block_diagonal_scores(slash: Tensor, width: int, kv_len: int, block: int) -> Tensor:
    """Slash mass one tile on each block-diagonal covers ``[B, H, Kb]``, from diagonal sums in bins of ``width``
    token diagonals (``[B, H, ceil(kv_len / width)]``; ``width`` divides ``block``; 1: per diagonal).

    A tile on block-diagonal ``t`` (query block ``r``, key block ``last_r - t``) holds ``block - |o - t * block|``
    entries of token diagonal ``o``, so it covers that diagonal's mass with weight ``1 - |o - t * block| / block``:
    every diagonal's mass is split between the two block-diagonals it crosses, the weights summing to 1. A bin
    takes the mean weight of its diagonals (exact for ``width`` 1, and for mass spread evenly within a bin)."""
    nb = block // width
    kb = -(-kv_len // block)
    x = slash[..., : kb * nb].float()
    x = torch.nn.functional.pad(x, (nb, kb * nb - x.shape[-1]))  # offsets -block..-1 first (none)
    windows = x.unfold(-1, 2 * nb, nb)  # block-diagonal t: offsets (t - 1) * block .. (t + 1) * block - 1

    def make():  # mean weight of each bin of a window: rising to 1 at offset t * block, then falling
        rise = torch.arange(block, dtype=torch.float32, device=x.device).view(nb, width).mean(-1) / block
        return torch.cat([rise, 1 - rise])

    return windows @ shape_constant(("diagonal_weights", block, width, device_key(x.device)), make)


def pool_blocks(x: Tensor, length: int, block: int) -> Tensor:
    """Sum over blocks of the last dim (of size ``length``): ``[..., L] -> [..., ceil(L / block)]``."""
    from ..ops.vertical_slash import pool_sum

    return pool_sum(x[..., :length], block)


def band_tiles(col_blocks: Tensor, bands: Tensor, q_len: int, kv_len: int, block: int, span: int = 2) -> Tensor:
    """``[B, H, Qb, Kb]`` tiles of selected key blocks and selected diagonal bands (``[B, H, Kb]`` bool each;
    band ``d`` holds the token diagonals ``d * block .. (d + 1) * block - 1``). Band ``d`` crosses query block
    ``r`` in key blocks ``L_r - d`` and the one before it: ``span=2`` computes both block-diagonals, ``span=1``
    only ``L_r - d`` (FlexPrefill's official mapping: one tile per band and query block)."""
    kb = col_blocks.shape[-1]
    diag = bands | torch.nn.functional.pad(bands, (1, 0))[..., :kb] if span == 2 else bands
    return block_tiles(col_blocks, diag, q_len, kv_len, block)


def sample_rows(q_len: int, block: int, samples: int, device) -> Tensor:
    """``[Qb, S]`` local query indices: ``samples`` evenly spaced queries per query block, ending at the
    block's last query (the one that sees every key block the block may select)."""
    def make():
        s = torch.arange(samples, device=device)
        offs = (block - 1) - ((samples - 1 - s) * block) // samples
        return (torch.arange(-(-q_len // block), device=device)[:, None] * block + offs).clamp(max=q_len - 1)

    return shape_constant(("sample_rows", q_len, block, samples, device_key(device)), make)


def top_indices(scores: Tensor, count: Tensor | int, forced: int = 0) -> Tensor:
    """Bool ``[..., N]``: the ``count`` highest entries per row (``count`` broadcastable), plus the first
    ``forced`` entries always. Ties go to the lower index (a stable sort), as in sparsa.ops.vertical_slash_blocks."""
    rank = rank_of(torch.argsort(scores, dim=-1, descending=True, stable=True))
    if isinstance(count, Tensor):
        while count.dim() < scores.dim():
            count = count.unsqueeze(-1)
    keep = rank < count  # a Python int stays a scalar: no host-to-device copy (a sync on CUDA)
    if forced:
        keep[..., :forced] = True
    return keep


def rank_of(order: Tensor) -> Tensor:
    """Each entry's place in the order given by a sort's indices: ``rank < count`` keeps the ``count`` first."""
    return torch.empty_like(order).scatter_(-1, order, arange(order.shape[-1], order.device).expand_as(order))


def block_tiles(col_blocks: Tensor, diag_blocks: Tensor, q_len: int, kv_len: int, block: int) -> Tensor:
    """``[B, H, Qb, Kb]`` map from selected key blocks (every row that sees them) and selected block-diagonals
    (``d``: key block ``L_r - d`` for query block ``r``), both ``[B, H, Kb]`` bool."""
    device = col_blocks.device
    kb = col_blocks.shape[-1]
    visible = causal_block_mask(q_len, kv_len, block, block, device)  # [Qb, Kb]
    distance, on_diagonal = _diagonals(q_len, kv_len, block, kb, device)
    lead = diag_blocks.shape[:2]
    on_band = torch.gather(diag_blocks[:, :, None, :].expand(*lead, *distance.shape), -1,
                           distance.expand(*lead, -1, -1))
    return (col_blocks[:, :, None, :] | (on_band & on_diagonal)) & visible


def _diagonals(q_len: int, kv_len: int, block: int, kb: int, device) -> tuple[Tensor, Tensor]:
    """``[Qb, Kb]``: which block-diagonal each tile is on (clamped at 0), and whether it is on or below the
    diagonal at all. Shape-only, so cached."""
    def distance():
        return last_visible_block(q_len, kv_len, block, block, device)[:, None] - arange(kb, device)[None, :]

    key = (q_len, kv_len, block, kb, device_key(device))
    return (shape_constant(("diagonal", *key), lambda: distance().clamp(min=0)),
            shape_constant(("below_diagonal", *key), lambda: distance() >= 0))


def force_sink_and_diagonal(tiles: Tensor, q_len: int, kv_len: int, block_q: int, block_k: int) -> Tensor:
    """Always compute key block 0 and each query block's last visible (diagonal) block: no row is empty."""
    kb, device = tiles.shape[-1], tiles.device
    diag = shape_constant(
        ("diagonal_tiles", q_len, kv_len, block_q, block_k, kb, device_key(device)),
        lambda: arange(kb, device)[None, :] == last_visible_block(q_len, kv_len, block_q, block_k, device)[:, None])
    tiles = tiles | diag
    tiles[..., 0] = True
    return tiles


# ------------------------------------------------------------------------------ Quest bounds of key blocks
def sampled_bounds(q: Tensor, k: Tensor, block: int, samples: int, *, key_real: Tensor | None = None,
                   query_real: Tensor | None = None, per_head: bool = False, pieces: int = 1,
                   max_elements: int = 1 << 26) -> Tensor:
    """Quest bounds of key blocks against sampled queries, reduced per query block (Tang et al., "Quest:
    Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024).

    ``q [B, Hq, Lq, D]`` (the last ``Lq`` positions), ``k [B, Hkv, Lk, D]``. Each query block is represented by
    ``samples`` of its queries (:func:`sample_rows`); each run of ``block`` keys by its elementwise max / min
    (:func:`block_bounds`). Returns float32 ``[B, Hkv, Qb, nb // pieces]`` (``per_head``: ``[B, Hq, ...]``): the
    max over the samples (and over the query heads of a KV group unless ``per_head``) of the bound, then over
    runs of ``pieces`` consecutive key blocks (``nb`` must be a multiple of ``pieces``).

    ``key_real [B, Lk]`` / ``query_real [B, Lq]`` (True = real token): padded keys take no part, a key block of
    padding only scores -inf, and padded sampled queries do not score. ``sparsa.ops.quest``: two Triton launches
    on CUDA (about fifteen PyTorch ops otherwise, whose launches dominate at 8K tokens), the PyTorch reference
    elsewhere, in slices of query blocks of at most ``max_elements`` scores so memory stays linear in length.
    """
    from ..ops.quest import quest_scores

    return quest_scores(q, k, block, samples, key_real=key_real, query_real=query_real, per_head=per_head,
                        pieces=pieces, max_elements=max_elements)
