"""Vertical-slash block selection: from per-head column and band scores to a block pattern's index lists.

The selection step of MInference's vertical-slash pattern (Jiang et al., "MInference 1.0: Accelerating
Pre-filling for Long-Context LLMs via Dynamic Sparse Attention", NeurIPS 2024) and of FlexPrefill's
vertical-slash heads (Lai et al., "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient
Long-Sequence Inference", ICLR 2025). Per batch and head, over ``Kb`` key blocks:

- the ``n_columns`` highest column scores select key blocks ("vertical" lines), plus the first
  ``forced_columns`` blocks;
- the ``n_bands`` highest band scores select diagonal bands ("slash" lines; band ``d`` holds the token
  diagonals ``d * block .. (d + 1) * block - 1``), plus the first ``forced_bands`` bands;
- query block ``r`` (whose last query sees key blocks ``0 .. last_r``) computes key block ``j <= last_r`` when
  ``j`` is a selected column or a selected band crosses it: band ``last_r - j``, and with ``band_tiles=2`` also
  band ``last_r - j - 1`` (a band of ``block`` token diagonals spans two block-diagonals; ``band_tiles=1`` takes
  the one at its own offset, as FlexPrefill's official code does, and spends one tile per band and row -- the
  cost of ``block`` diagonals); or when ``extra_tiles`` has it (FlexPrefill's query-aware map); and always key
  block 0 and the diagonal block ``last_r``.

Ties among scores go to the lower index (a stable descending sort). Returned as ``(kv_num_blocks [B, H, Qb]
int32, kv_indices [B, H, Qb, Kb] int32)``: each row's blocks in increasing order, then zeros -- the layout of
:class:`sparsa.BlockPattern`.

Two implementations with the same contract: ``naive`` (the PyTorch chain of ``sparsa.prefill.estimate``:
argsorts, scatters, a gathered tile map and a cumulative-sum compaction; about twenty-five small kernels, ~1.4 ms
per call at 32K tokens on the H200, a sixth of vertical_slash's whole prefill) and ``triton`` (two launches: one
program per head ranks both score rows by a bitonic sort of a packed score-and-index key; one program per query
block builds its tiles from the selected lines and compacts them). The Triton kernels run on CUDA, and on the CPU
under ``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._fallback import dispatch
from .topk_blocks import MAX_TRITON_BLOCKS


def vertical_slash_blocks(column_scores: Tensor, band_scores: Tensor, n_columns: int | Tensor,
                          n_bands: int | Tensor, *, forced_columns: int = 0, forced_bands: int = 0, q_len: int,
                          kv_len: int, block: int, extra_tiles: Tensor | None = None, band_tiles: int = 2,
                          backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``(kv_num_blocks, kv_indices)`` of the selection described in the module docstring.

    ``column_scores`` / ``band_scores`` ``[B, H, Kb]`` float (``Kb = ceil(kv_len / block)``; the queries are the
    last ``q_len`` of ``kv_len`` positions); ``n_columns`` / ``n_bands``: an int, or an integer tensor
    broadcastable to ``[B, H]`` (``[B, H, 1]`` too), any value (above ``Kb`` selects all); ``extra_tiles``:
    optional bool ``[B, H, Qb, Kb]`` tiles to compute as well. ``backend``: auto | triton | naive (auto: triton
    for CUDA tensors when Triton is importable and rows are at most ``MAX_TRITON_BLOCKS`` wide).
    """
    b, h, kb = _check(column_scores, band_scores, q_len, kv_len, block, extra_tiles)
    n_columns = _budget("n_columns", n_columns, b, h)
    n_bands = _budget("n_bands", n_bands, b, h)
    if band_tiles not in (1, 2):
        raise ValueError(f"band_tiles must be 1 or 2, got {band_tiles!r}")
    for name, value in (("forced_columns", forced_columns), ("forced_bands", forced_bands)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    def reference():
        return vertical_slash_blocks_naive(column_scores, band_scores, n_columns, n_bands,
                                           forced_columns=forced_columns, forced_bands=forced_bands, q_len=q_len,
                                           kv_len=kv_len, block=block, extra_tiles=extra_tiles,
                                           band_tiles=band_tiles)

    def fast():
        return _vertical_slash_blocks_triton(column_scores, band_scores, n_columns, n_bands, forced_columns,
                                             forced_bands, q_len, kv_len, block, extra_tiles, band_tiles)

    return dispatch("vertical_slash_blocks", backend, on_gpu=column_scores.is_cuda and kb <= MAX_TRITON_BLOCKS,
                    fast=fast, reference=reference)


def vertical_slash_blocks_naive(column_scores: Tensor, band_scores: Tensor, n_columns: int | Tensor,
                                n_bands: int | Tensor, *, forced_columns: int = 0, forced_bands: int = 0,
                                q_len: int, kv_len: int, block: int, extra_tiles: Tensor | None = None,
                                band_tiles: int = 2) -> tuple[Tensor, Tensor]:
    """Plain PyTorch reference of :func:`vertical_slash_blocks`: the chain the selectors ran before this op."""
    from ..pattern import BlockPattern
    from ..prefill import estimate

    b, h = column_scores.shape[:2]
    columns = estimate.top_indices(column_scores, _budget("n_columns", n_columns, b, h), forced=forced_columns)
    diagonals = estimate.top_indices(band_scores, _budget("n_bands", n_bands, b, h), forced=forced_bands)
    tiles = estimate.band_tiles(columns, diagonals, q_len, kv_len, block, span=band_tiles)
    if extra_tiles is not None:
        tiles = tiles | extra_tiles
    tiles = estimate.force_sink_and_diagonal(tiles, q_len, kv_len, block, block)
    pattern = BlockPattern.from_block_mask(tiles, q_len=q_len, kv_len=kv_len, block_q=block)
    return pattern.kv_num_blocks, pattern.kv_indices


def _check(column_scores, band_scores, q_len, kv_len, block, extra_tiles) -> tuple[int, int, int]:
    qb, kb = -(-q_len // block), -(-kv_len // block)
    for name, x in (("column_scores", column_scores), ("band_scores", band_scores)):
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != kb:
            raise ValueError(f"{name} must be a [B, H, {kb}] tensor for kv_len={kv_len}, block={block}; got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else x!r}")
    if band_scores.shape != column_scores.shape:
        raise ValueError(f"band_scores {tuple(band_scores.shape)} and column_scores "
                         f"{tuple(column_scores.shape)} must have the same shape")
    b, h = column_scores.shape[:2]
    if extra_tiles is not None and (not isinstance(extra_tiles, Tensor) or extra_tiles.dtype != torch.bool
                                    or tuple(extra_tiles.shape) != (b, h, qb, kb)):
        got = (extra_tiles.dtype, tuple(extra_tiles.shape)) if isinstance(extra_tiles, Tensor) else extra_tiles
        raise ValueError(f"extra_tiles must be a bool [{b}, {h}, {qb}, {kb}] tensor, got {got!r}")
    return b, h, kb


def _budget(name: str, count, b: int, h: int):
    """An int as it is; a tensor as an integer ``[B, H, 1]`` view (so that ``rank < count`` compares per row)."""
    if isinstance(count, Tensor):
        if count.is_floating_point() or count.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {count.dtype}")
        while count.dim() > 2 and count.shape[-1] == 1:
            count = count.squeeze(-1)
        try:
            return count.expand(b, h)[..., None]
        except RuntimeError:
            raise ValueError(f"{name} must broadcast to [{b}, {h}], got {tuple(count.shape)}") from None
    if not isinstance(count, int) or isinstance(count, bool):
        raise ValueError(f"{name} must be an int or an integer tensor, got {count!r}")
    return count


def _vertical_slash_blocks_triton(column_scores, band_scores, n_columns, n_bands, forced_columns, forced_bands,
                                  q_len, kv_len, block, extra_tiles, band_tiles=2):
    import triton

    from ._vs_select_kernels import select_lines_kernel, tiles_kernel

    b, h, kb = column_scores.shape
    qb = -(-q_len // block)
    device = column_scores.device
    col, band = (x if x.stride(-1) == 1 else x.contiguous() for x in (column_scores, band_scores))
    kb_p2 = triton.next_power_of_2(max(kb, 16))
    col_flags = torch.empty(b, h, kb, dtype=torch.uint8, device=device)
    band_flags = torch.empty(b, h, kb, dtype=torch.uint8, device=device)

    def budget(count):
        """(pointer, strides, scalar, per-head) kernel arguments; an int is clamped to [0, Kb] (an int32)."""
        if isinstance(count, Tensor):
            return count, count.stride(0), count.stride(1), 0, True
        return col_flags, 0, 0, min(max(count, 0), kb), False

    nc, nc_b, nc_h, n_col, col_per_head = budget(n_columns)
    nd, nd_b, nd_h, n_band, band_per_head = budget(n_bands)
    select_lines_kernel[(b * h,)](col, band, col_flags, band_flags, nc, nd, h, kb,
                                  col.stride(0), col.stride(1), band.stride(0), band.stride(1),
                                  nc_b, nc_h, nd_b, nd_h, n_col, n_band, min(forced_columns, kb),
                                  min(forced_bands, kb), COL_PER_HEAD=col_per_head, BAND_PER_HEAD=band_per_head,
                                  KB_P2=kb_p2)
    num = torch.empty(b, h, qb, dtype=torch.int32, device=device)
    idx = torch.empty(b, h, qb, kb, dtype=torch.int32, device=device)
    extra = None if extra_tiles is None else extra_tiles.contiguous().view(torch.uint8)
    tiles_kernel[(b * h * qb,)](col_flags, band_flags, col_flags if extra is None else extra, num, idx, qb, kb,
                                block, block, q_len, kv_len - q_len, HAS_EXTRA=extra is not None,
                                TWO_TILES=band_tiles == 2, KB_P2=kb_p2)
    return num, idx


__all__ = ["vertical_slash_blocks", "vertical_slash_blocks_naive"]
