"""Causal top-k block selection: from a ``[B, H, Qb, Kb]`` score map to a block pattern's index lists.

Per query block ``r`` (whose last query sees key blocks ``0 .. last_r``), the computed key blocks are:

- the ``topk`` highest-scoring *routed candidates*: visible blocks that are not forced and score above ``-inf``
  (a block of padding only scores ``-inf`` and is never routed to);
- the forced blocks: the first ``sink`` blocks and the ``local`` blocks just before the diagonal (visible only);
- the diagonal block ``last_r``, so that no query is left without a key.

Returned as ``(kv_num_blocks [B, H, Qb] int32, kv_indices [B, H, Qb, Kb] int32)``: each row's blocks in
increasing order, then zeros -- the layout of :class:`sparsa.BlockPattern`. Ties among routed scores go to the
lower block index.

Two implementations with the same contract: ``naive`` (plain PyTorch: ``topk``, a scatter, a cumulative-sum
compaction; about twenty small kernels) and ``triton`` (one launch, one program per row: the k-th largest of a
packed score-and-index key by a bitonic sort, then the compaction). At 8K tokens on the H200 an eager dynamic
selector spends more time launching small kernels than computing (BENCHMARKS.md, session 5's profile); this
step was a third of them. The Triton kernel runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._fallback import dispatch


# Rows wider than this many key blocks (512K tokens in 128-token blocks) take the naive path: the sort of a row
# lives in one program's registers.
MAX_TRITON_BLOCKS = 4096


def topk_blocks(scores: Tensor, topk: int, *, q_len: int, kv_len: int, block: int, sink: int = 0, local: int = 0,
                backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``(kv_num_blocks, kv_indices)`` of the causal top-k selection described in the module docstring.

    ``scores [B, H, Qb, Kb]`` float (``Qb = ceil(q_len / block)``, ``Kb = ceil(kv_len / block)``; the queries
    are the last ``q_len`` of ``kv_len`` positions); ``topk >= 1`` routed blocks per row; ``sink`` / ``local``
    forced blocks. ``backend``: auto | triton | naive (auto: triton for CUDA tensors when Triton is importable).
    """
    qb, kb = -(-q_len // block), -(-kv_len // block)
    if not isinstance(scores, Tensor) or scores.dim() != 4 or tuple(scores.shape[-2:]) != (qb, kb):
        raise ValueError(f"scores must be a [B, H, {qb}, {kb}] tensor for q_len={q_len}, kv_len={kv_len}, "
                         f"block={block}; got {tuple(scores.shape) if isinstance(scores, Tensor) else scores!r}")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")
    for name, value in (("sink", sink), ("local", local)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    def reference():
        return topk_blocks_naive(scores, topk, q_len=q_len, kv_len=kv_len, block=block, sink=sink, local=local)

    def fast():
        return _topk_blocks_triton(scores, topk, q_len, kv_len, block, sink, local)

    return dispatch("topk_blocks", backend, on_gpu=scores.is_cuda and kb <= MAX_TRITON_BLOCKS, fast=fast,
                    reference=reference)


def topk_blocks_naive(scores: Tensor, topk: int, *, q_len: int, kv_len: int, block: int, sink: int = 0,
                      local: int = 0) -> tuple[Tensor, Tensor]:
    """Plain PyTorch reference of :func:`topk_blocks`."""
    from ..pattern import arange, last_visible_block

    qb, kb = scores.shape[-2:]
    device = scores.device
    j = arange(kb, device)[None, :]
    last = last_visible_block(q_len, kv_len, block, block, device)[:, None]  # [Qb, 1]
    visible = j <= last
    forced = visible & ((j < sink) | ((j < last) & (j >= last - local)))
    candidate = visible & ~forced
    masked = scores.float().masked_fill(~candidate, float("-inf"))
    # A stable descending sort breaks ties toward the lower block index, as the Triton kernel does.
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., : min(topk, kb)]
    picked = torch.zeros(scores.shape, dtype=torch.bool, device=device)
    picked.scatter_(-1, order, torch.gather(masked, -1, order) > float("-inf"))
    keep = picked | forced | (j == last.clamp(max=kb - 1))
    num = keep.sum(-1, dtype=torch.int32)
    slot = torch.where(keep, keep.cumsum(-1) - 1, kb)  # unkept entries go to a spill column
    idx = torch.zeros(*keep.shape[:-1], kb + 1, dtype=torch.int32, device=device)
    idx.scatter_(-1, slot, arange(kb, device, torch.int32).expand(keep.shape))
    return num.contiguous(), idx[..., :kb].contiguous()


def _topk_blocks_triton(scores, topk, q_len, kv_len, block, sink, local):
    import triton

    from ._topk_kernels import topk_rows_kernel

    b, h, qb, kb = scores.shape
    scores = scores.float()
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    num = torch.empty(b, h, qb, dtype=torch.int32, device=scores.device)
    idx = torch.empty(b, h, qb, kb, dtype=torch.int32, device=scores.device)
    topk_rows_kernel[(b * h * qb,)](scores, num, idx, qb, kb, scores.stride(0), scores.stride(1), scores.stride(2),
                                    h, topk, block, block, q_len, kv_len - q_len, sink, local,
                                    KB_P2=triton.next_power_of_2(max(kb, 16)))
    return num, idx


__all__ = ["topk_blocks", "topk_blocks_naive", "MAX_TRITON_BLOCKS"]
