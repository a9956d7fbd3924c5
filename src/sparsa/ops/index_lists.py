"""Per-row candidate lists to a block pattern's index lists: the last step of the selectors that collect
key blocks from several sources (HiP: sink, window and searched blocks), ``BlockPattern.from_index_lists``.

``index_lists(idx, keep, kv_len=..., block=...)``: ``idx [B, H, Qb, C]`` candidate key blocks, ``keep`` which of
them are used (the kept ones distinct, in any order). Returns ``(kv_num_blocks [B, H, Qb] int32, kv_indices
[B, H, Qb, min(C, Kb)] int32)``: each row's kept blocks in increasing order, then zeros.

Two implementations with the same contract: ``naive`` (a masked sort and a few elementwise ops: about ten small
kernels) and ``triton`` (one launch, one program per row sorting its ``C`` candidates in registers). The kernel
runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._fallback import dispatch

# Candidates one program sorts in registers; wider rows take the naive path.
_MAX_CANDIDATES = 4096


def index_lists(idx: Tensor, keep: Tensor, *, kv_len: int, block: int, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``(kv_num_blocks, kv_indices)`` from candidate lists (module docstring)."""
    if not isinstance(idx, Tensor) or idx.dim() != 4 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"idx must be an integer [B, H, Qb, C] tensor, got {idx!r:.80}")
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != idx.shape:
        raise ValueError(f"keep must be a bool tensor shaped like idx {tuple(idx.shape)}")

    def reference():
        return index_lists_naive(idx, keep, kv_len=kv_len, block=block)

    def fast():
        return _index_lists_triton(idx, keep, kv_len, block)

    return dispatch("index_lists", backend, on_gpu=idx.is_cuda and idx.shape[-1] <= _MAX_CANDIDATES, fast=fast,
                    reference=reference)


def index_lists_naive(idx: Tensor, keep: Tensor, *, kv_len: int, block: int) -> tuple[Tensor, Tensor]:
    """Plain PyTorch reference of :func:`index_lists` (without a device sync: the width is bounded by the block
    count)."""
    kb = -(-kv_len // block)
    key = torch.where(keep, idx, kb).sort(-1).values
    num = keep.sum(-1, dtype=torch.int32)
    width = min(idx.shape[-1], kb)
    key = key[..., :width]
    valid = torch.arange(width, device=idx.device) < num[..., None]
    return num.contiguous(), torch.where(valid, key, 0).to(torch.int32).contiguous()


def _index_lists_triton(idx, keep, kv_len, block):
    import triton

    from ._compact import sort_rows_kernel

    b, h, qb, c = idx.shape
    kb = -(-kv_len // block)
    width = min(c, kb)
    idx = idx.contiguous()
    keep = keep.contiguous().view(torch.uint8)
    num = torch.empty(b, h, qb, dtype=torch.int32, device=idx.device)
    out = torch.empty(b, h, qb, width, dtype=torch.int32, device=idx.device)
    sort_rows_kernel[(b * h * qb,)](idx, keep, num, out, c, width, kb, C_P2=triton.next_power_of_2(max(c, 16)))
    return num, out


__all__ = ["index_lists", "index_lists_naive"]
