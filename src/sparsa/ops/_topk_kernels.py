"""Triton kernel behind ``sparsa.ops.topk_blocks``: per row of a block score map, the top-k routed key blocks
plus the forced ones, written straight out as a compacted index list (imported only when Triton is used).

One program per row (batch x head x query block). The row width is rounded up to a power of two (``KB_P2``, a
compile-time size), so a new prompt length recompiles only when the block count crosses one.
"""

import triton
import triton.language as tl

from ._compact import rank_key, row_coords, store_row


@triton.jit
def topk_rows_kernel(score_ptr, num_ptr, idx_ptr, QB, KB, s_b, s_h, s_q, H, TOPK, BQ, BK, Q_LEN, OFFSET,
                     SINK, LOCAL, KB_P2: tl.constexpr):
    row, r, h, b = row_coords(QB, H)
    j = tl.arange(0, KB_P2)
    in_row = j < KB
    s = tl.load(score_ptr + b * s_b + h * s_h + r * s_q + j, mask=in_row, other=float("-inf"))
    # the key block that holds the last key this query block's last query can see
    last = (tl.minimum((r + 1) * BQ, Q_LEN) - 1 + OFFSET) // BK
    visible = in_row & (j <= last)
    forced = visible & ((j < SINK) | ((j < last) & (j >= last - LOCAL)))
    candidate = visible & (forced == 0) & (s > float("-inf"))
    key = tl.where(candidate, rank_key(s, j, KB_P2), -9223372036854775807 - 1)
    n_candidates = tl.sum(candidate.to(tl.int32), 0)
    if TOPK < n_candidates:
        ranked = tl.sort(key, 0, descending=True)
        kth = tl.sum(tl.where(j == TOPK - 1, ranked, 0), 0)  # the k-th largest key (keys are distinct)
        picked = candidate & (key >= kth)
    else:
        picked = candidate
    keep = picked | forced | (j == tl.minimum(last, KB - 1))
    store_row(keep, j, idx_ptr, num_ptr, row, KB, KB_P2)
