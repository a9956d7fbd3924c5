"""Triton kernels behind ``sparsa.ops.quest`` (imported only when Triton is used): Quest bounds (Tang et al.,
ICML 2024) of key blocks against sampled queries, in two launches.

* ``bounds_kernel``, program (batch x KV head, tile of ``TILE`` key blocks): each block's elementwise max and min
  over its real keys, read ``ROWS`` positions at a time (padding and the short last block's tail take no
  part), plus whether the block has a real key at all.
* ``scores_kernel``, program (batch x output head, tile of ``QT`` query blocks): the sampled rows of its query
  blocks -- ``S_P2`` samples x ``G_P2`` query heads of the KV group each (one head when ``PER_HEAD``) -- split
  into ``relu(q)`` and ``min(q, 0)`` once, then for every ``BLOCK_N`` key blocks two ``tl.dot`` with the
  blocks' max and min, padded rows and dead blocks set to -inf, and the max over each query block's rows and
  over each run of ``PIECES`` key blocks taken in registers before one store.

Lengths are runtime arguments, so a new prompt length does not recompile. Triton 3.6's CPU interpreter cannot
take a tensor as a loop bound, so there (``STATIC_LOOP``) the key loop runs ``N_LOOP`` times, a constant.
"""

import triton
import triton.language as tl


@triton.jit
def block_max_min(k_rows, s_kl, real_row, c, LK, d, d_ok, BLOCK: tl.constexpr, HAS_REAL: tl.constexpr,
                  TILE: tl.constexpr, DT: tl.constexpr, ROWS: tl.constexpr):
    """Key blocks ``c`` (``[TILE]``) of one sequence and KV head (rows at ``k_rows``, stride ``s_kl``), head
    dims ``d`` (``[DT]``, valid where ``d_ok``): each block's elementwise max and min over its real keys (``-inf`` /
    ``+inf`` where it has none) and its count of real keys, read ``ROWS`` positions at a time. Padding (``real_row``
    ``[LK]`` int8 when ``HAS_REAL``) and the short last block's tail take no part. Shared by Quest's bounds and
    HiP's sparse table."""
    hi = tl.full([TILE, DT], float("-inf"), tl.float32)
    lo = tl.full([TILE, DT], float("inf"), tl.float32)
    count = tl.zeros([TILE], tl.int32)
    for start in range(0, BLOCK, ROWS):
        r = start + tl.arange(0, ROWS)
        pos = c[:, None] * BLOCK + r[None, :]  # [TILE, ROWS]
        ok = (pos < LK) & (r < BLOCK)[None, :]
        if HAS_REAL:
            ok = ok & (tl.load(real_row + pos, mask=ok, other=0) != 0)
        ok3 = ok[:, :, None] & d_ok[None, None, :]
        x = tl.load(k_rows + pos.to(tl.int64)[:, :, None] * s_kl + d[None, None, :], mask=ok3, other=0.0)
        x = x.to(tl.float32)
        hi = tl.maximum(hi, tl.max(tl.where(ok3, x, float("-inf")), 1))
        lo = tl.minimum(lo, tl.min(tl.where(ok3, x, float("inf")), 1))
        count += tl.sum(ok.to(tl.int32), 1)
    return hi, lo, count


@triton.jit
def bounds_kernel(k_ptr, real_ptr, kmax_ptr, kmin_ptr, alive_ptr, LK, NB, s_kb, s_kh, s_kl, HKV: tl.constexpr,
                  D: tl.constexpr, BLOCK: tl.constexpr, HAS_REAL: tl.constexpr, TILE: tl.constexpr,
                  ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """``k [B, HKV, LK, D]`` (strides ``s_kb, s_kh, s_kl``, unit stride over D: the transposed views a model's
    attention passes in are read in place) -> ``kmax``, ``kmin`` ``[B*HKV, NB, D]`` (zero for a block without a
    real key) and ``alive [B*HKV, NB]`` int8. ``real [B, LK]`` int8 (1 = real key) when ``HAS_REAL``."""
    bh = tl.program_id(0).to(tl.int64)  # (bh * LK + pos) * D passes 2**31 at batch 4, 8 KV heads, 512K keys
    b = bh // HKV
    c = tl.program_id(1) * TILE + tl.arange(0, TILE)  # key blocks
    d = tl.arange(0, BLOCK_D)
    k_rows = k_ptr + b * s_kb + (bh % HKV) * s_kh
    hi, lo, count = block_max_min(k_rows, s_kl, real_ptr + b * LK, c, LK, d, d < D, BLOCK, HAS_REAL, TILE,
                                  BLOCK_D, ROWS)
    alive = count > 0
    # Zero, not +-inf, for a dead block: relu(q) = 0 times -inf would be NaN in the dot; the block is masked.
    hi = tl.where(alive[:, None], hi, 0.0)
    lo = tl.where(alive[:, None], lo, 0.0)
    out = (bh * NB + c[:, None]) * D + d[None, :]
    mask = (c < NB)[:, None] & (d < D)[None, :]
    tl.store(kmax_ptr + out, hi.to(kmax_ptr.dtype.element_ty), mask=mask)
    tl.store(kmin_ptr + out, lo.to(kmin_ptr.dtype.element_ty), mask=mask)
    tl.store(alive_ptr + bh * NB + c, alive.to(tl.int8), mask=c < NB)


@triton.jit
def _score_tile(qp, qn, row_ok, kmax_kv, kmin_kv, alive_kv, out_h, q0, t, QB, NB, NOUT, D: tl.constexpr,
                BLOCK_D: tl.constexpr, QT: tl.constexpr, PER_BLOCK: tl.constexpr, PIECES: tl.constexpr,
                PIECES_P2: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr):
    """Output columns ``[t * BLOCK_C, (t + 1) * BLOCK_C)`` of the program's query blocks. Column ``j`` of the
    tile is piece ``j % PIECES_P2`` of output column ``j // PIECES_P2`` (pieces past ``PIECES`` are -inf)."""
    BLOCK_N: tl.constexpr = BLOCK_C * PIECES_P2
    j = tl.arange(0, BLOCK_N)
    col = t * BLOCK_C + j // PIECES_P2
    piece = j % PIECES_P2
    kb = col * PIECES + piece
    col_ok = (piece < PIECES) & (col < NOUT) & (kb < NB)
    d = tl.arange(0, BLOCK_D)
    at = kb[None, :] * D + d[:, None]  # [BLOCK_D, BLOCK_N]: the blocks' bounds, transposed
    mask = col_ok[None, :] & (d < D)[:, None]
    hi = tl.load(kmax_kv + at, mask=mask, other=0.0)
    lo = tl.load(kmin_kv + at, mask=mask, other=0.0)
    if IEEE:  # float32 inputs: exact products, as the PyTorch path (TF32 would round q to 10 bits)
        s = tl.dot(qp, hi, input_precision="ieee") + tl.dot(qn, lo, input_precision="ieee")
    else:
        s = tl.dot(qp, hi) + tl.dot(qn, lo)
    alive = tl.load(alive_kv + kb, mask=col_ok, other=0) != 0
    s = tl.where(row_ok[:, None] & alive[None, :], s, float("-inf"))
    best = tl.max(tl.reshape(s, [QT, PER_BLOCK, BLOCK_N]), 1)  # over samples (and group heads)
    best = tl.max(tl.reshape(best, [QT, BLOCK_C, PIECES_P2]), 2)  # over each run of PIECES key blocks
    r = q0 + tl.arange(0, QT)
    c = t * BLOCK_C + tl.arange(0, BLOCK_C)
    tl.store(out_h + r[:, None] * NOUT + c[None, :], best, mask=(r < QB)[:, None] & (c < NOUT)[None, :])


@triton.jit
def scores_kernel(q_ptr, rows_ptr, real_ptr, kmax_ptr, kmin_ptr, alive_ptr, out_ptr, LQ, QB, NB, NOUT, n_tiles,
                  s_qb, s_qh, s_ql,
                  HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, SAMPLES: tl.constexpr,
                  PIECES: tl.constexpr, PER_HEAD: tl.constexpr, HAS_REAL: tl.constexpr, D: tl.constexpr,
                  BLOCK_D: tl.constexpr, QT: tl.constexpr, G_P2: tl.constexpr, S_P2: tl.constexpr,
                  PIECES_P2: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr, STATIC_LOOP: tl.constexpr,
                  N_LOOP: tl.constexpr):
    """``out [B * H, QB, NOUT]`` float32 (H = HQ when ``PER_HEAD``, else HKV) from ``q [B, HQ, LQ, D]`` (strides
    ``s_qb, s_qh, s_ql``, unit over D), the
    sampled local rows ``rows [QB, SAMPLES]`` (int64), ``real [B, LQ]`` int8 (1 = real query) when
    ``HAS_REAL``, and ``bounds_kernel``'s outputs. ``N_LOOP``: the key loop's static bound under the
    interpreter (unused otherwise)."""
    PER_BLOCK: tl.constexpr = G_P2 * S_P2
    h = tl.program_id(0).to(tl.int64)
    q0 = tl.program_id(1) * QT
    if PER_HEAD:
        b = h // HQ
        kv = (h % HQ) // GROUP
        head0 = h % HQ
    else:
        b = h // HKV
        kv = h % HKV
        head0 = kv * GROUP
    # Row i: query block q0 + i // PER_BLOCK, group head (i // S_P2) % G_P2, sample i % S_P2.
    i = tl.arange(0, QT * PER_BLOCK)
    qblk = q0 + i // PER_BLOCK
    g = (i // S_P2) % G_P2
    s = i % S_P2
    row_ok = (qblk < QB) & (s < SAMPLES)
    if not PER_HEAD:
        row_ok = row_ok & (g < GROUP)
    pos = tl.load(rows_ptr + qblk * SAMPLES + s, mask=row_ok, other=0)
    if HAS_REAL:
        row_ok = row_ok & (tl.load(real_ptr + b * LQ + pos, mask=row_ok, other=0) != 0)
    d = tl.arange(0, BLOCK_D)
    x = tl.load(q_ptr + (b * s_qb + (head0 + g) * s_qh + pos * s_ql)[:, None] + d[None, :],
                mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
    # kept in q's dtype for the tensor cores, fp32 accumulation (tl.maximum on bf16 computes in fp32: cast back)
    qp = tl.maximum(x, 0.0).to(q_ptr.dtype.element_ty)
    qn = tl.minimum(x, 0.0).to(q_ptr.dtype.element_ty)
    kv_row = b * HKV + kv
    kmax_kv = kmax_ptr + kv_row * NB * D
    kmin_kv = kmin_ptr + kv_row * NB * D
    alive_kv = alive_ptr + kv_row * NB
    out_h = out_ptr + h * QB * NOUT
    if STATIC_LOOP:
        for t in range(0, N_LOOP):
            _score_tile(qp, qn, row_ok, kmax_kv, kmin_kv, alive_kv, out_h, q0, t, QB, NB, NOUT, D, BLOCK_D, QT,
                        PER_BLOCK, PIECES, PIECES_P2, BLOCK_C, IEEE)
    else:
        for t in range(0, n_tiles):
            _score_tile(qp, qn, row_ok, kmax_kv, kmin_kv, alive_kv, out_h, q0, t, QB, NB, NOUT, D, BLOCK_D, QT,
                        PER_BLOCK, PIECES, PIECES_P2, BLOCK_C, IEEE)
