"""Triton helpers shared by the selection kernels, and the row sort of ``sparsa.ops.index_lists`` (imported only
when Triton is used)."""

import triton
import triton.language as tl


@triton.jit
def store_row(keep, j, idx_ptr, num_ptr, row, KB, KB_P2: tl.constexpr):
    """Write one row of a BlockPattern: the kept key blocks ``j`` in increasing order (a stable compaction: an
    entry's slot is the number of kept entries before it), zeros after them up to ``KB``, and their count."""
    count = tl.sum(keep.to(tl.int32), 0)
    slot = tl.cumsum(keep.to(tl.int32), 0) - 1
    base = row * KB
    tl.store(idx_ptr + base + j, tl.zeros([KB_P2], tl.int32), mask=(j < KB) & (j >= count))
    tl.store(idx_ptr + base + slot, j.to(tl.int32), mask=keep)
    tl.store(num_ptr + row, count)


@triton.jit
def sort_rows_kernel(idx_ptr, keep_ptr, num_ptr, out_ptr, C, W, KB, C_P2: tl.constexpr):
    """One program per row of ``C`` candidates (contiguous rows): the kept ones sorted, then zeros, ``W`` wide."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, C_P2)
    inside = c < C
    ix = tl.load(idx_ptr + row * C + c, mask=inside, other=0)
    kept = tl.load(keep_ptr + row * C + c, mask=inside, other=0) != 0
    ranked = tl.sort(tl.where(kept, ix, KB).to(tl.int32), 0)  # unkept entries sort last
    count = tl.sum(kept.to(tl.int32), 0)
    tl.store(out_ptr + row * W + c, tl.where(c < count, ranked, 0), mask=c < W)
    tl.store(num_ptr + row, count)


@triton.jit
def row_coords(QB, H):
    """``(row, r, h, b)`` of this program, one program per (batch, head, query block) row."""
    row = tl.program_id(0).to(tl.int64)
    r = row % QB
    bh = row // QB
    return row, r, bh % H, bh // H


@triton.jit
def rank_key(s, index, P2: tl.constexpr):
    """An int64 sort key of float32 scores ``s`` that orders by score, then by lower ``index`` (so keys are
    distinct and ties break the same way every run): the float bits made monotone as signed ints in the high
    word, the reversed index in the low word."""
    bits = s.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (P2 - 1 - index).to(tl.int64)
