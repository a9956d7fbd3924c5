"""Triton kernel behind ``sparsa.ops.triton_attention`` (imported only when Triton is used).

One program per (query tile, batch x query head). It reads its row of the pattern (``kv_num_blocks``,
``kv_indices``) and walks the selected key blocks in ``BLOCK_N`` slices with an online softmax in base 2 --
FlashAttention's forward pass over an index list. The mask (key length, causal diagonal, key padding) is
evaluated only on slices that can need it; the others are whole. GQA without repeating keys: a query head reads
key head ``h // GROUP``. Patterns may be per query head, per KV head or shared (``PH_DIV`` and zero strides).
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in float32. ``UPCAST``: in float32 (Triton 3.6's CPU interpreter returns garbage for a
    bf16 ``tl.dot``); ``IEEE``: exact float32 products, not TF32 (float32 inputs)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _slice(q, k_base, v_base, pad_row, idx_row, it, m_i, l_i, acc, q_pos, first_pos, offs_n, offs_d, offs_dv,
           s_kn, s_vn, LK, SCALE_LOG2, BK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
           BLOCK_N: tl.constexpr, SUB: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
           IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One ``BLOCK_N`` slice of the ``it // SUB``-th selected key block, folded into the online softmax."""
    blk = tl.load(idx_row + it // SUB)
    start = blk * BK + (it % SUB) * BLOCK_N
    keys = start + offs_n
    in_len = keys < LK
    kt = tl.load(k_base + keys[None, :].to(tl.int64) * s_kn + offs_d[:, None],
                 mask=in_len[None, :] & (offs_d < D)[:, None], other=0.0)
    s = _dot(q, kt, IEEE, UPCAST) * SCALE_LOG2
    needs_mask = (start + BLOCK_N > LK) | HAS_PAD
    if CAUSAL:
        needs_mask = needs_mask | (start + BLOCK_N - 1 > first_pos)
    if needs_mask:
        keep = in_len[None, :]
        if CAUSAL:
            keep = keep & (keys[None, :] <= q_pos[:, None])
        if HAS_PAD:
            real = tl.load(pad_row + keys, mask=in_len, other=0)
            keep = keep & (real != 0)[None, :]
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - shift[:, None])
    alpha = tl.math.exp2(m_i - shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    vt = tl.load(v_base + keys[:, None].to(tl.int64) * s_vn + offs_dv[None, :],
                 mask=in_len[:, None] & (offs_dv < DV)[None, :], other=0.0)
    pv = _dot(p.to(vt.dtype), vt, IEEE, UPCAST)
    acc = acc * alpha[:, None] + pv
    m_i = m_new
    return m_i, l_i, acc


@triton.jit
def sparse_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, num_ptr, idx_ptr, pad_ptr,
                            s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
                            s_nb, s_nh, s_nr, s_ib, s_ih, s_ir, s_pb,
                            HQ, GROUP, PH_DIV, LQ, LK, OFFSET, SCALE_LOG2,
                            BQ: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                            IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    kv_h = h // GROUP
    ph = h // PH_DIV
    m0 = pid_m * BLOCK_M
    row = m0 // BQ  # BLOCK_M divides BQ: a tile lies in one pattern row

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    q_base = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * s_qm + offs_d[None, :],
                mask=(offs_m < LQ)[:, None] & (offs_d < D)[None, :], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * s_kb + kv_h.to(tl.int64) * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + kv_h.to(tl.int64) * s_vh
    q_pos = offs_m + OFFSET  # absolute positions of the queries among the keys
    # The first query of the tile sees every key at or before first_pos; a slice ending there needs no mask.
    first_pos = m0 + OFFSET

    n_blocks = tl.load(num_ptr + b * s_nb + ph * s_nh + row * s_nr)
    idx_row = idx_ptr + b.to(tl.int64) * s_ib + ph.to(tl.int64) * s_ih + row.to(tl.int64) * s_ir
    SUB: tl.constexpr = BK // BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    pad_row = pad_ptr + b.to(tl.int64) * s_pb
    if INTERPRET:  # Triton's CPU interpreter cannot take a runtime loop bound in range(); a while loop works
        it = 0
        while it < n_blocks * SUB:
            m_i, l_i, acc = _slice(q, k_base, v_base, pad_row, idx_row, it, m_i, l_i, acc, q_pos, first_pos,
                                   offs_n, offs_d, offs_dv, s_kn, s_vn, LK, SCALE_LOG2, BK, D, DV, BLOCK_N, SUB,
                                   CAUSAL, HAS_PAD, IEEE, INTERPRET)
            it += 1
    else:  # a for loop, which the compiler software-pipelines (loads of the next slice during this one's math)
        for it in range(0, n_blocks * SUB):
            m_i, l_i, acc = _slice(q, k_base, v_base, pad_row, idx_row, it, m_i, l_i, acc, q_pos, first_pos,
                                   offs_n, offs_d, offs_dv, s_kn, s_vn, LK, SCALE_LOG2, BK, D, DV, BLOCK_N, SUB,
                                   CAUSAL, HAS_PAD, IEEE, INTERPRET)

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_base = o_ptr + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh
    row_ok = offs_m < LQ
    tl.store(o_base + offs_m[:, None].to(tl.int64) * s_om + offs_dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv < DV)[None, :])
    # Natural-log log-sum-exp: m and log2(l) are in base 2. Rows that saw no key: -inf.
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * LQ + offs_m, lse, mask=row_ok)
