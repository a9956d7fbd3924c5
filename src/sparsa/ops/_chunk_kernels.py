"""Triton kernel behind ``sparsa.ops.chunk_blocks``: per query-block row, LongHeads' forced and best-scoring
chunks, written straight out as a compacted index list (imported only when Triton is used).

One program per row (batch x head x query block), one lane per key block; a block carries its chunk's score and
key, so the k-th largest chunk is the (k * per)-th largest lane. The row width is rounded up to a power of two
(``KB_P2``, a compile-time size), so a new prompt length recompiles only when the block count crosses one.
"""

import triton
import triton.language as tl

from ._compact import store_row


@triton.jit
def chunk_rows_kernel(score_ptr, num_ptr, idx_ptr, QB, KB, C, W, s_b, s_h, s_q, H, BS, PER, TOTAL, BEGIN, Q_LEN,
                      OFFSET, KB_P2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    r = row % QB
    bh = row // QB
    h = bh % H
    b = bh // H
    j = tl.arange(0, KB_P2)
    first_pos = r * BS + OFFSET
    last_pos = tl.minimum((r + 1) * BS, Q_LEN) - 1 + OFFSET
    last = last_pos // BS
    visible = (j < KB) & (j <= last)
    keep = visible  # a row that starts before begin_selective_length: every visible block
    if first_pos >= BEGIN:
        span = PER * BS
        cur_first = first_pos // span
        cur_last = last_pos // span
        c = j // PER
        lo = tl.maximum(cur_first - 1, 1)
        hi = tl.minimum(lo + 2, cur_last)
        forced = visible & ((c == 0) | ((c >= lo) & (c <= hi)))
        n_top = tl.minimum(tl.maximum(TOTAL - 1 - tl.maximum(hi - lo + 1, 0), 0), tl.minimum(TOTAL, C))
        s = tl.load(score_ptr + b * s_b + h * s_h + r * s_q + c, mask=visible & (c < C), other=float("-inf"))
        s = tl.where(s == 0.0, 0.0, s)  # -0.0 ranks with 0.0, as in torch.sort
        candidate = visible & (c >= 1) & (c < cur_first - 1) & (c < C) & (s > float("-inf"))
        # Sort key: float32 bits made monotone as signed ints in the high word, the reversed chunk index in the
        # low word (the lower chunk wins a tie); a chunk's blocks share its key.
        bits = s.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = (ordered.to(tl.int64) << 32) | (KB_P2 - 1 - c).to(tl.int64)
        key = tl.where(candidate, key, -9223372036854775807 - 1)
        need = n_top * PER
        picked = candidate & (need > 0)
        if need < tl.sum(candidate.to(tl.int32), 0):
            ranked = tl.sort(key, 0, descending=True)
            kth = tl.sum(tl.where(j == need - 1, ranked, 0), 0)  # the key of the n_top-th best chunk
            picked = picked & (key >= kth)
        keep = forced | picked
    store_row(keep, j, idx_ptr, num_ptr, row, W, KB_P2)
