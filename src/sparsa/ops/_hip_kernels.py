"""Triton kernels behind ``sparsa.ops.hip_search`` (imported only when Triton is used): HiP's coarse-to-fine tree
search (Lee et al., ICLR 2025) scored by the Quest bound of each node's keys (Tang et al., ICML 2024), in two
launches.

* ``table_kernel``, program (batch x KV head, tile of ``DT`` head dims): the sparse table of the key blocks'
  elementwise max and min -- level 0 from the keys (padding and the short last block's tail take no part), then
  level ``j`` as the max / min of two level ``j - 1`` entries ``2^(j-1)`` blocks apart. A program owns its dims at
  every level, so it only reads what it wrote itself: a barrier between levels is all the ordering it needs.
* ``search_kernel``, program (batch x KV head, query block): the block's sampled queries of every head of the KV
  group, split into ``relu(q)`` and ``min(q, 0)`` once and kept in registers; then, per level, both children of
  each of the ``k`` kept nodes, their bounds from two table windows, two ``tl.dot`` against the samples, the
  causal / padding mask, the max over samples and heads, and the top ``k`` of the ``2k`` children by rank (a
  ``[2k, 2k]`` compare; ties go to the lower child index). The kept children move to the next level's ``k`` node
  slots in rank order by a one-hot reduction (a ``[k, 2k]`` tile), so the whole search stays in registers; only
  the final ``k`` block ranges are stored.

Lengths are runtime arguments (a new prompt length recompiles only when the level counts change). Triton 3.6's CPU
interpreter cannot take a tensor as a loop bound, so there (``STATIC_LOOP``) the table's block loop runs
``N_LOOP`` times, a constant.
"""

import triton
import triton.language as tl

from ._quest_kernels import block_max_min


@triton.jit
def _table_level0(k_head, s_kl, real_ptr, kmax_ptr, kmin_ptr, b, row0, t, LK, KB, D: tl.constexpr,
                  BLOCK: tl.constexpr, HAS_REAL: tl.constexpr, DT: tl.constexpr, TB: tl.constexpr,
                  ROWS: tl.constexpr, d, d_ok):
    """Level 0 for key blocks ``[t * TB, (t + 1) * TB)``: max / min over each block's real keys (``-inf`` /
    ``+inf`` for a block without one, as the PyTorch table)."""
    c = t * TB + tl.arange(0, TB)
    hi, lo, _ = block_max_min(k_head, s_kl, real_ptr + b * LK, c, LK, d, d_ok, BLOCK, HAS_REAL, TB, DT, ROWS)
    at = (row0 + c[:, None]) * D + d[None, :]  # level 0 of this sequence and head's rows
    mask = (c < KB)[:, None] & d_ok[None, :]
    tl.store(kmax_ptr + at, hi.to(kmax_ptr.dtype.element_ty), mask=mask)
    tl.store(kmin_ptr + at, lo.to(kmin_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _table_level(kmax_ptr, kmin_ptr, row0, j, t, KB, D: tl.constexpr, TB: tl.constexpr, d, d_ok):
    """Level ``j`` for blocks ``[t * TB, (t + 1) * TB)``: the max / min of level ``j - 1`` at ``c`` and
    ``c + 2^(j-1)``; entries whose window runs off the end (``c > KB - 2^j``) are never read, so never written."""
    c = t * TB + tl.arange(0, TB)
    half = 1 << (j - 1)
    ok = (c + 2 * half <= KB)[:, None] & d_ok[None, :]
    a = (row0 + (j - 1) * KB + c[:, None]) * D + d[None, :]
    out = (row0 + j * KB + c[:, None]) * D + d[None, :]
    hi = tl.maximum(tl.load(kmax_ptr + a, mask=ok), tl.load(kmax_ptr + a + half * D, mask=ok))
    lo = tl.minimum(tl.load(kmin_ptr + a, mask=ok), tl.load(kmin_ptr + a + half * D, mask=ok))
    tl.store(kmax_ptr + out, hi.to(kmax_ptr.dtype.element_ty), mask=ok)  # tl.maximum of bf16 is fp32: cast back
    tl.store(kmin_ptr + out, lo.to(kmin_ptr.dtype.element_ty), mask=ok)


@triton.jit
def table_kernel(k_ptr, real_ptr, kmax_ptr, kmin_ptr, LK, KB, n_tiles, s_kb, s_kh, s_kl, HKV: tl.constexpr,
                 D: tl.constexpr,
                 BLOCK: tl.constexpr, LEVELS: tl.constexpr, HAS_REAL: tl.constexpr, DT: tl.constexpr,
                 TB: tl.constexpr, ROWS: tl.constexpr, STATIC_LOOP: tl.constexpr, N_LOOP: tl.constexpr):
    """``k [B, HKV, LK, D]`` (strides ``s_kb, s_kh, s_kl``, unit over D: a model's transposed keys are read in
    place) -> ``kmax``, ``kmin`` ``[B*HKV, LEVELS * KB, D]`` in k's dtype (exact: a max of keys is
    a key), level ``j`` at rows ``j * KB + c`` covering blocks ``c .. c + 2^j - 1``. ``real [B, LK]`` int8 (1 =
    real key) when ``HAS_REAL``. ``n_tiles = ceil(KB / TB)``."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // HKV
    d = tl.program_id(1) * DT + tl.arange(0, DT)
    d_ok = d < D
    row0 = bh * LEVELS * KB  # this sequence and head's first table row
    k_head = k_ptr + b * s_kb + (bh % HKV) * s_kh
    if STATIC_LOOP:
        for t in range(0, N_LOOP):
            _table_level0(k_head, s_kl, real_ptr, kmax_ptr, kmin_ptr, b, row0, t, LK, KB, D, BLOCK, HAS_REAL, DT,
                          TB, ROWS, d, d_ok)
    else:
        for t in range(0, n_tiles):
            _table_level0(k_head, s_kl, real_ptr, kmax_ptr, kmin_ptr, b, row0, t, LK, KB, D, BLOCK, HAS_REAL, DT,
                          TB, ROWS, d, d_ok)
    for j in tl.static_range(1, LEVELS):
        tl.debug_barrier()  # level j - 1 (this program's dims only) is written before it is read
        if STATIC_LOOP:
            for t in range(0, N_LOOP):
                _table_level(kmax_ptr, kmin_ptr, row0, j, t, KB, D, TB, d, d_ok)
        else:
            for t in range(0, n_tiles):
                _table_level(kmax_ptr, kmin_ptr, row0, j, t, KB, D, TB, d, d_ok)


@triton.jit
def search_kernel(q_ptr, rows_ptr, real_ptr, nodes_ptr, kmax_ptr, kmin_ptr, out_ptr, LQ, LK, KB, TOPK,
                  s_qb, s_qh, s_ql, HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, SAMPLES: tl.constexpr,
                  BLOCK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, S_P2: tl.constexpr,
                  G_P2: tl.constexpr, K_P2: tl.constexpr, LEVELS: tl.constexpr, TABLE_LEVELS: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_REAL: tl.constexpr, IEEE: tl.constexpr):
    """``LEVELS`` levels of the search for query block ``program_id(1)`` of sequence / KV head ``program_id(0)``.

    ``q [B, HQ, LQ, D]`` (strides ``s_qb, s_qh, s_ql``, unit over D; the last ``LQ`` of ``LK`` positions);
    ``rows [QB, SAMPLES]`` int64, the sampled local query rows; ``real [B, LK]`` int8 (1 = real) when
    ``HAS_REAL``; ``nodes [QB, TOPK, 2]`` int64, the initial block ranges ``[lo, hi)``; ``kmax`` / ``kmin`` from
    ``table_kernel`` (``TABLE_LEVELS`` levels). Writes ``out [B*HKV, QB, TOPK, 2]`` int64, the kept ``[lo, hi)``
    after the last level, best first.
    ``CAUSAL``: a sample scores only the children whose first block it sees (no window block before the diagonal,
    or padding)."""
    C: tl.constexpr = 2 * K_P2  # children slots, child 2i + side of node slot i
    bh = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1)
    b = bh // HKV
    kv = bh % HKV
    # Row i of the samples: group head i // S_P2, sample i % S_P2.
    i = tl.arange(0, S_P2 * G_P2)
    g = i // S_P2
    s = i % S_P2
    row_ok = (s < SAMPLES) & (g < GROUP)
    pos = tl.load(rows_ptr + r * SAMPLES + s, mask=row_ok, other=0)
    key_pos = pos + (LK - LQ)
    if HAS_REAL:  # padded queries do not score
        row_ok = row_ok & (tl.load(real_ptr + b * LK + key_pos, mask=row_ok, other=0) != 0)
    q_blk = key_pos // BLOCK
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    x = tl.load(q_ptr + (b * s_qb + (kv * GROUP + g) * s_qh + pos * s_ql)[:, None] + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    dtype = q_ptr.dtype.element_ty
    # kept in q's dtype for the tensor cores, fp32 accumulation (tl.maximum on bf16 computes in fp32: cast back)
    qp = tl.maximum(x, 0.0).to(dtype)
    qn = tl.minimum(x, 0.0).to(dtype)

    slot = tl.arange(0, K_P2)
    node_at = nodes_ptr + (r * TOPK + slot) * 2
    lo = tl.load(node_at, mask=slot < TOPK, other=0).to(tl.int32)
    n = tl.load(node_at + 1, mask=slot < TOPK, other=0).to(tl.int32) - lo  # empty past TOPK
    c = tl.arange(0, C)
    kmax_kv = kmax_ptr + bh * TABLE_LEVELS * KB * D
    kmin_kv = kmin_ptr + bh * TABLE_LEVELS * KB * D
    for _ in range(LEVELS):
        # Both halves of every node, interleaved: [lo, lo + n // 2) and [lo + n // 2, lo + n).
        half = n // 2
        c_lo = tl.reshape(tl.join(lo, lo + half), [C])
        c_n = tl.reshape(tl.join(half, n - half), [C])
        # Its two windows of 2^floor(log2 n) blocks (level 0 at lo twice when empty: dead, not loaded).
        lvl = tl.zeros([C], tl.int32)
        for j in tl.static_range(1, TABLE_LEVELS):
            lvl += (c_n >= (1 << j)).to(tl.int32)
        w1 = lvl * KB + c_lo
        w2 = w1 + c_n - (1 << lvl)
        load_ok = (c_n > 0)[None, :] & d_ok[:, None]
        at1 = w1[None, :] * D + d[:, None]  # [BLOCK_D, C]: the bounds, transposed for the dot
        at2 = w2[None, :] * D + d[:, None]
        hi = tl.maximum(tl.load(kmax_kv + at1, mask=load_ok, other=float("-inf")),
                        tl.load(kmax_kv + at2, mask=load_ok, other=float("-inf")))
        lo_b = tl.minimum(tl.load(kmin_kv + at1, mask=load_ok, other=float("inf")),
                          tl.load(kmin_kv + at2, mask=load_ok, other=float("inf")))
        alive = c_n > 0
        if HAS_REAL:  # a child without a real key has kmax = -inf in every dim
            alive = alive & (tl.max(tl.where(d_ok[:, None], hi, float("-inf")), 0) > float("-inf"))
        # zero, not +-inf, for a dead child: 0 * inf would be NaN in the dot (the child is masked below)
        hi = tl.where(alive[None, :], hi, 0.0).to(dtype)
        lo_b = tl.where(alive[None, :], lo_b, 0.0).to(dtype)
        if IEEE:  # float32 inputs: exact products, as the PyTorch path (TF32 would round q to 10 bits)
            score = tl.dot(qp, hi, input_precision="ieee") + tl.dot(qn, lo_b, input_precision="ieee")
        else:
            score = tl.dot(qp, hi) + tl.dot(qn, lo_b)
        ok = row_ok[:, None]
        if CAUSAL:
            ok = ok & (q_blk[:, None] >= c_lo[None, :])
        best = tl.max(tl.where(ok, score, float("-inf")), 0)  # over samples and group heads
        best = tl.where(alive, best, float("-inf"))
        # Top TOPK of the 2 * TOPK children by rank: child j outranks child c when it scores higher, or the same
        # with a lower index (so ties go to the lower child, and -inf children are ranked too). A [C, C] compare
        # (C <= 64) is cheaper than a sort network here, and the rank is the kept child's slot (score order).
        valid = c < 2 * TOPK
        s_j = best[:, None]
        s_c = best[None, :]
        beats = valid[:, None] & ((s_j > s_c) | ((s_j == s_c) & (c[:, None] < c[None, :])))
        rank = tl.sum(beats.to(tl.int32), 0)  # [C]: children ranked above c
        picked = valid & (rank < TOPK)
        onehot = picked[None, :] & (rank[None, :] == slot[:, None])  # [K_P2, C]
        lo = tl.sum(tl.where(onehot, c_lo[None, :], 0), 1)
        n = tl.sum(tl.where(onehot, c_n[None, :], 0), 1)
    out = out_ptr + ((bh * tl.num_programs(1) + r) * TOPK + slot) * 2
    tl.store(out, lo.to(tl.int64), mask=slot < TOPK)
    tl.store(out + 1, (lo + n).to(tl.int64), mask=slot < TOPK)
