"""Triton kernel behind ``sparsa.ops.chunk_blocks``: per query-block row, LongHeads' forced and best-scoring
chunks, written straight out as a compacted index list (imported only when Triton is used).

One program per row (batch x head x query block): the k-th largest chunk key by a bitonic sort over one lane per
chunk, then one lane per key block, each carrying its chunk's key, for the compaction. Widths are rounded up to
powers of two (``C_P2``, ``KB_P2``, compile-time sizes), so a new prompt length recompiles only when a count
crosses one.
"""

import triton
import triton.language as tl

from ._compact import rank_key, row_coords, store_row


@triton.jit
def _chunk_key(s, c, cur_first, C, C_P2: tl.constexpr):
    """Sort key of chunk ``c`` with score ``s`` (``rank_key``: the lower chunk wins a tie; the int64 minimum for a
    non-candidate). Candidates: complete chunks ``1 .. cur_first - 2`` scoring above -inf."""
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 ranks with 0.0, as in torch.sort
    candidate = (c >= 1) & (c < cur_first - 1) & (c < C) & (s > float("-inf"))
    return tl.where(candidate, rank_key(s, c, C_P2), -9223372036854775807 - 1)


@triton.jit
def chunk_rows_kernel(score_ptr, num_ptr, idx_ptr, QB, KB, C, W, s_b, s_h, s_q, H, BS, PER, TOTAL, BEGIN, Q_LEN,
                      OFFSET, C_P2: tl.constexpr, KB_P2: tl.constexpr):
    row, r, h, b = row_coords(QB, H)
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
        row_scores = score_ptr + b * s_b + h * s_h + r * s_q
        n_top = tl.minimum(tl.maximum(TOTAL - 1 - tl.maximum(hi - lo + 1, 0), 0), tl.minimum(TOTAL, C))
        # the n_top-th best candidate chunk, over one lane per chunk
        cc = tl.arange(0, C_P2)
        key_c = _chunk_key(tl.load(row_scores + cc, mask=cc < C, other=float("-inf")), cc, cur_first, C, C_P2)
        n_cand = tl.sum((key_c > -9223372036854775807 - 1).to(tl.int32), 0)
        kth = -9223372036854775807  # every candidate, when there are no more than n_top
        if n_top < n_cand:
            ranked = tl.sort(key_c, 0, descending=True)
            kth = tl.sum(tl.where(cc == n_top - 1, ranked, 0), 0)
        # each key block takes its chunk's key
        s = tl.load(row_scores + c, mask=visible & (c < C), other=float("-inf"))
        key = _chunk_key(s, c, cur_first, C, C_P2)
        picked = visible & (key >= kth) & (n_top > 0)
        keep = forced | picked
    store_row(keep, j, idx_ptr, num_ptr, row, W, KB_P2)
