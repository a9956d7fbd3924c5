"""Triton kernel behind ``sparsa.ops.flex.split_lists_triton``: one launch splits every row's key blocks into
partial and full tiles and compacts both lists (imported only when Triton is used).

One program per output row (batch x query head x query block). The row width is rounded up to a power of two
(``W_P2``, a compile-time size), so a new prompt length recompiles only when the block count crosses one.
"""

import triton
import triton.language as tl


@triton.jit
def split_rows_kernel(num_ptr, idx_ptr, full_ptr, ok_ptr, map_ptr, pn_ptr, pi_ptr, fn_ptr, fi_ptr,
                      H_OUT, QB, IDX_W, W, s_nb, s_nh, s_nq, s_ib, s_ih, s_iq, s_fb, s_fh, s_fq, s_ok,
                      BQ, BK, OFFSET, KV_LEN, CAUSAL: tl.constexpr, HAS_FULL: tl.constexpr, HAS_OK: tl.constexpr,
                      HAS_MAP: tl.constexpr, W_P2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * W passes 2**31 at batch 8, 32 heads, 128K tokens
    r = row % QB
    bh = row // QB
    h = bh % H_OUT
    b = bh // H_OUT
    if HAS_MAP:  # per-KV-head pattern read by each query head of its group
        src = tl.load(map_ptr + h)
    else:
        src = h
    n = tl.load(num_ptr + b * s_nb + src * s_nh + r * s_nq)
    j = tl.arange(0, W_P2)
    valid = (j < n) & (j < IDX_W)
    blocks = tl.load(idx_ptr + b * s_ib + src * s_ih + r * s_iq + j, mask=valid, other=0)
    # Full: wholly inside the key length, below the causal diagonal, free of padding, whole under the token mask.
    full = valid & ((blocks + 1) * BK <= KV_LEN)
    if CAUSAL:
        full = full & ((blocks + 1) * BK - 1 <= r * BQ + OFFSET)
    if HAS_OK:
        full = full & (tl.load(ok_ptr + b * s_ok + blocks, mask=valid, other=0) != 0)
    if HAS_FULL:
        full = full & (tl.load(full_ptr + b * s_fb + src * s_fh + r * s_fq + j, mask=valid, other=0) != 0)
    partial = valid & (full == 0)
    in_row = j < W
    base = row * W
    p_count = tl.sum(partial.to(tl.int32), 0)
    f_count = tl.sum(full.to(tl.int32), 0)
    # Stable compaction: an entry's slot is the number of kept entries before it; the rest of the row is zero.
    p_slot = tl.cumsum(partial.to(tl.int32), 0) - 1
    f_slot = tl.cumsum(full.to(tl.int32), 0) - 1
    tl.store(pi_ptr + base + j, tl.zeros([W_P2], tl.int32), mask=in_row & (j >= p_count))
    tl.store(fi_ptr + base + j, tl.zeros([W_P2], tl.int32), mask=in_row & (j >= f_count))
    tl.store(pi_ptr + base + p_slot, blocks, mask=partial)
    tl.store(fi_ptr + base + f_slot, blocks, mask=full)
    tl.store(pn_ptr + row, p_count)
    tl.store(fn_ptr + row, f_count)
