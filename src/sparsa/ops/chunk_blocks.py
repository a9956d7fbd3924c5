"""LongHeads' chunk selection: from per-row chunk scores to a block pattern's index lists.

The selection step of LongHeads (Lu et al., "LongHeads: Multi-Head Attention is Secretly a Long Context
Processor", 2024), as ``sparsa.prefill.longheads`` maps it onto ``block x block`` tiles. The keys are cut into
chunks of ``per`` key blocks (``window_size = per * block`` tokens); query block ``r`` (queries ``r * block ..``,
positions offset by ``kv_len - q_len``; its last query sees key blocks ``0 .. last_r``) computes:

- every visible key block, when its first query lies before ``begin`` (``begin_selective_length``);
- otherwise the visible blocks of the forced chunks -- chunk 0 and the chunks ``lo .. min(lo + 2, cur_last)``,
  ``lo = max(cur_first - 1, 1)``, where ``cur_first`` / ``cur_last`` hold the row's first and last query -- and
  of the best-scoring candidate chunks: complete chunks ``1 .. cur_first - 2`` scoring above ``-inf``, as many as
  ``total`` minus one minus the forced chunks after chunk 0 (and at most ``min(total, C)``).

Ties among chunk scores go to the lower chunk index. Returned as ``(kv_num_blocks [B, H, Qb] int32, kv_indices
[B, H, Qb, W] int32)``: each row's blocks in increasing order, then zeros; ``W`` bounds every row's count
(``min(Kb, (4 + min(total, C)) * per + dense)``, ``dense`` the blocks of the last row before ``begin``).

Two implementations with the same contract: ``naive`` (plain PyTorch: a top-k over the candidates, the forced and
dense layout, a sort-based compaction; about twenty small kernels: LongHeads' selection took 0.5-0.95 ms at 8K
on the H200 with them and 0.16-0.32 ms with the kernel, BENCHMARKS.md session 8) and ``triton`` (one launch, one program per row: the k-th largest chunk key
by a bitonic sort over the row's chunks, then its key blocks kept by their chunk's key, and the compaction). The
kernel runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._shapes import device_key, shape_constant
from ._fallback import dispatch
from .topk_blocks import MAX_TRITON_BLOCKS


def chunk_blocks(scores: Tensor, *, q_len: int, kv_len: int, block: int, per: int, total: int, begin: int,
                 backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``(kv_num_blocks, kv_indices)`` of the selection described in the module docstring.

    ``scores [B, H, Qb, C]`` float, ``C = kv_len // (per * block)`` complete chunks (``C`` may be 0);
    ``per >= 1`` key blocks per chunk; ``total >= 1`` chunks per row; ``begin >= 0``. ``backend``: auto | triton |
    naive (auto: triton for CUDA tensors when Triton is importable).
    """
    qb, kb = -(-q_len // block), -(-kv_len // block)
    n_chunks = kv_len // (per * block) if per >= 1 else -1
    if not isinstance(scores, Tensor) or scores.dim() != 4 or tuple(scores.shape[-2:]) != (qb, n_chunks):
        raise ValueError(f"scores must be a [B, H, {qb}, {n_chunks}] tensor for q_len={q_len}, kv_len={kv_len}, "
                         f"block={block}, per={per}; got "
                         f"{tuple(scores.shape) if isinstance(scores, Tensor) else scores!r}")
    for name, value, low in (("total", total, 1), ("begin", begin, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    def reference():
        return chunk_blocks_naive(scores, q_len=q_len, kv_len=kv_len, block=block, per=per, total=total,
                                  begin=begin)

    def fast():
        return _chunk_blocks_triton(scores, q_len, kv_len, block, per, total, begin)

    return dispatch("chunk_blocks", backend, on_gpu=scores.is_cuda and kb <= MAX_TRITON_BLOCKS, fast=fast,
                    reference=reference)


def width(q_len: int, kv_len: int, block: int, per: int, total: int, begin: int) -> int:
    """Index-list width: the most blocks any row can hold."""
    kb, off = -(-kv_len // block), kv_len - q_len
    n_chunks = kv_len // (per * block)
    dense = 0
    if off < begin:
        row = min(-(-q_len // block) - 1, (begin - 1 - off) // block)  # the last row before begin
        dense = (min((row + 1) * block, q_len) - 1 + off) // block + 1
    return max(1, min(kb, (4 + min(total, n_chunks)) * per + dense))


def chunk_blocks_naive(scores: Tensor, *, q_len: int, kv_len: int, block: int, per: int, total: int,
                       begin: int) -> tuple[Tensor, Tensor]:
    """Plain PyTorch reference of :func:`chunk_blocks`."""
    from ..pattern import BlockPattern

    b, h, qb, n_chunks = scores.shape
    lay = _layout(q_len, kv_len, block, per, total, begin, scores.device)
    shape = (b, h, -1, -1)
    blocks, ok = lay["forced"].expand(shape), lay["forced_ok"].expand(shape)
    ktop = min(total, n_chunks)
    if ktop > 0:
        masked = torch.where(lay["candidates"], scores.float(), float("-inf"))
        # A stable descending sort breaks ties toward the lower chunk index, as the Triton kernel does.
        order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :ktop]
        top_ok = (torch.gather(masked, -1, order) > float("-inf"))[..., None] & lay["slot_ok"]
        top_blocks = order[..., None] * per + torch.arange(per, device=scores.device)
        blocks = torch.cat((blocks, top_blocks.flatten(-2)), -1)
        ok = torch.cat((ok, top_ok.flatten(-2)), -1)
    # the candidate lists are width() wide before the cap at Kb, so the index lists come out width() wide
    pattern = BlockPattern.from_index_lists(blocks, ok, q_len=q_len, kv_len=kv_len, block=block)
    return pattern.kv_num_blocks, pattern.kv_indices


def _layout(q_len, kv_len, block, per, total, begin, device) -> dict[str, Tensor]:
    """Shape-only tensors per query block (made once per geometry and device): ``forced [Qb, F]`` key blocks
    computed whatever the scores and ``forced_ok``, which of them are; ``candidates [Qb, C]``, the chunks a row may
    pick by score; ``slot_ok [Qb, min(total, C), per]``, which top-scoring slots it uses."""
    def make():
        from ..pattern import last_visible_block

        w, off, qb = per * block, kv_len - q_len, -(-q_len // block)
        r = torch.arange(qb, device=device)
        last = last_visible_block(q_len, kv_len, block, block, device)  # [Qb]
        first_pos = r * block + off
        cur_first = first_pos // w
        cur_last = (((r + 1) * block).clamp(max=q_len) - 1 + off) // w
        full_row = first_pos < begin
        loc = (cur_first - 1).clamp(min=1)[:, None] + torch.arange(3, device=device)
        loc_ok = loc <= cur_last[:, None]
        chunks = torch.cat((torch.zeros(qb, 1, dtype=torch.long, device=device), loc), -1)  # distinct per row
        chunk_ok = torch.cat((torch.ones_like(loc_ok[:, :1]), loc_ok), -1) & ~full_row[:, None]
        blocks = (chunks[..., None] * per + torch.arange(per, device=device)).flatten(-2)
        ok = chunk_ok.repeat_interleave(per, -1) & (blocks <= last[:, None])
        if off < begin:  # rows before begin: every causally visible block
            row = min(qb - 1, (begin - 1 - off) // block)
            last_full = (min((row + 1) * block, q_len) - 1 + off) // block
            dense = torch.arange(last_full + 1, device=device).expand(qb, -1)
            blocks = torch.cat((blocks, dense), -1)
            ok = torch.cat((ok, (dense <= last[:, None]) & full_row[:, None]), -1)
        n_chunks = kv_len // w
        c = torch.arange(n_chunks, device=device)
        n_top = (total - 1 - loc_ok.sum(-1)).clamp(min=0)
        slot_ok = (torch.arange(min(total, n_chunks), device=device) < n_top[:, None]) & ~full_row[:, None]
        return {"forced": blocks, "forced_ok": ok, "candidates": (c >= 1) & (c < cur_first[:, None] - 1),
                "slot_ok": slot_ok[..., None].expand(-1, -1, per)}

    return shape_constant(("chunk_blocks", q_len, kv_len, block, per, total, begin, device_key(device)), make)


def _chunk_blocks_triton(scores, q_len, kv_len, block, per, total, begin):
    import triton

    from ._chunk_kernels import chunk_rows_kernel

    b, h, qb, n_chunks = scores.shape
    kb = -(-kv_len // block)
    scores = scores.float()
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    w = width(q_len, kv_len, block, per, total, begin)
    num = torch.empty(b, h, qb, dtype=torch.int32, device=scores.device)
    idx = torch.empty(b, h, qb, w, dtype=torch.int32, device=scores.device)
    chunk_rows_kernel[(b * h * qb,)](scores, num, idx, qb, kb, n_chunks, w, scores.stride(0), scores.stride(1),
                                     scores.stride(2), h, block, per, total, begin, q_len, kv_len - q_len,
                                     C_P2=triton.next_power_of_2(max(n_chunks, 16)),
                                     KB_P2=triton.next_power_of_2(max(kb, 16)))
    return num, idx


__all__ = ["chunk_blocks", "chunk_blocks_naive", "width"]
