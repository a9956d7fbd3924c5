"""Triton kernel behind ``sparsa.ops.sale_estimate`` (imported only when Triton is used).

One program per (query block, ``HEADS`` query heads of one KV head). For every causally visible key block it
takes ``tl.dot`` of the integer values (fp16 operands, fp32 accumulation: exact) per head, then per query row
the best estimate in the tile against the row's threshold. Lengths are runtime arguments, so a new prompt
length does not recompile.

Why it is shaped this way. Compiled for sm_90 as launched at 128K (aligned pointers, 64-query blocks, D 128,
32 query / 8 KV heads), the previous kernel -- one head per program, a static power-of-two loop with an ``if``
inside -- had no software pipelining and ~900 SASS instructions per thread per 64x64 tile (128 I2F and 272
PRMT of them converting both int8 operands, every iteration), ~3.5x the tile's tensor-core time in issue
slots alone, before the unhidden L2 waits. This one: ~560 instructions per thread per loop iteration of 4
head-tiles (~140 per head-tile, about half the tile's tensor time, and FMA + max are 264 of them), 170
registers and 96 KB of shared memory, so two programs share an SM and one's epilogue hides behind the other's
wgmma. The floor is the tensor cores: 70 TFLOP at 128K, ~71 ms at the H200's fp16 peak.

* Runtime loop bounds and no ``if`` in the loop body: the loop is one ``scf.for`` that Triton's software
  pipeliner rewrites, so the next K tile is copied (cp.async) into shared memory while the tensor cores work
  on this one. The old ``if`` hid the load from the pipeliner: every iteration waited on L2.
* K arrives in fp16 (converted once by the caller): global -> shared memory -> wgmma, with no per-tile
  int8->fp16 conversion (I2F issues at a quarter rate; the old loop converted 16K values per tile) and no
  register round trip. Q is converted once per program, before the loop.
* Key blocks fully visible to every query of the block run unmasked: no causal ``where``, no bounds masks.
  Only the one or two blocks touching the diagonal (or the end of the keys) take the masked path.
* Folded epilogue: ``best_i = max_j(dots_ij * (q_scale_i * k_scale_c) + col_j)`` per row -- one FMA and one
  max per element -- then ``(best_i + row_i) * SCALE >= need_i`` once per row. Float rounding is monotone, so
  this is the same as testing every element after adding ``row_i`` and scaling (SCALE < 0 takes the min).
  Same semantics as before, including ``need = +inf`` (never passes), ``need = -inf`` (passes on any visible
  key) and ``-inf`` key terms (padded keys); only the last bit of the estimate can differ (as the PyTorch
  reference's already does), because q_scale * k_scale is formed first.
* GQA: the ``HEADS`` (1, 2 or 4) query heads of one KV head share a program, so each K tile is loaded once
  into shared memory and used by HEADS dots: a quarter of the L2->SM traffic at 32 query / 8 KV heads. The
  heads are separate 64-row dots rather than one stacked 256-row dot because each head has its own key term
  ``col``: stacked, it becomes a 256x64 tile that Triton loads in a blocked layout and moves into the
  accumulator layout through shared memory every iteration (+64 KB of shared memory, 255 registers, a third
  more instructions); per head it is a 64-vector loaded straight into that layout.
* No block-wide reduction: a row that passes stores 1 into its head's tile flag (the output starts at zero,
  so several rows writing the same 1 is harmless), and the row max stays inside a warp (shuffles).
* Grid: query blocks vary fastest and the heaviest (last) come first within each head group, so the programs
  running at once share one KV head's K (32 MB at 128K: it stays in the 50 MB L2), and the short programs
  fill the end of the launch.

Triton's CPU interpreter (TRITON_INTERPRET=1; triton 3.6 with numpy 2.4) cannot use a tensor as a loop bound
(``int()`` of its 1-element array raises), so under the interpreter (``STATIC_LOOP``) the same tile code runs
from a static loop with a branch; for the GPU that branch is compiled out.
"""

import triton
import triton.language as tl


@triton.jit
def _head_rows(q_ptr, qs_ptr, row_ptr, need_ptr, col_ptr, out_ptr, h, r, LQ, LK, QB, KB, D: tl.constexpr,
               BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Head ``h``'s query block ``r``: fp16 q, its per-row terms, and its key-term and output row pointers.
    Padding rows (past LQ) get q = 0 and need = +inf."""
    i = r * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    rows_ok = i < LQ
    q = tl.load(q_ptr + (h * LQ + i[:, None]) * D + d[None, :], mask=rows_ok[:, None] & (d < D)[None, :], other=0)
    q_scale = tl.load(qs_ptr + h * LQ + i, mask=rows_ok, other=0.0)
    row = tl.load(row_ptr + h * LQ + i, mask=rows_ok, other=0.0)
    need = tl.load(need_ptr + h * LQ + i, mask=rows_ok, other=float("inf"))
    return q.to(tl.float16), q_scale, row, need, col_ptr + h * LK, out_ptr + (h * QB + r) * KB


@triton.jit
def _test_head(h, kt, k_scale, j, q_pos, rows_ok, c, LK, SCALE: tl.constexpr, BLOCK: tl.constexpr,
               MASKED: tl.constexpr):
    """One head against key block ``c`` (``kt``: its fp16 keys, transposed): sets the tile flag when a row
    passes. ``MASKED``: the block touches the diagonal or the end of the keys."""
    q, q_scale, row, need, col_head, out_head = h
    # Integer values in fp16, fp32 accumulation: exact (|q.k| <= 127 * 127 * D < 2**24). An int8 x int8 dot
    # faulted on the H200 (cudaErrorInvalidAddressSpace, triton 3.6, 2026-11-29).
    dots = tl.dot(q, kt, out_dtype=tl.float32)
    if MASKED:
        col = tl.load(col_head + j, mask=j < LK, other=0.0)
    else:
        col = tl.load(col_head + j)
    v = dots * (q_scale * k_scale)[:, None] + col[None, :]
    if SCALE >= 0:  # the estimate (v + row) * SCALE grows with v: a row's best key has the largest v
        if MASKED:
            v = tl.where(j[None, :] <= q_pos[:, None], v, float("-inf"))
        best = tl.max(v, 1)
    else:
        if MASKED:
            v = tl.where(j[None, :] <= q_pos[:, None], v, float("inf"))
        best = tl.min(v, 1)
    ok = ((best + row) * SCALE >= need) & rows_ok
    if MASKED:  # a row that sees no key of the block must not pass (need = -inf would pass on the fill)
        ok = ok & (q_pos >= c * BLOCK)
    tl.store(out_head + c + tl.zeros_like(q_pos), tl.full([BLOCK], 1, tl.int8), mask=ok)


@triton.jit
def _test_block(h0, h1, h2, h3, q_pos, rows_ok, k_kv, ks_kv, c, LK, D: tl.constexpr, HEADS: tl.constexpr,
                SCALE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """Key block ``c``, loaded once, against the program's heads (one dot and epilogue at a time: one
    accumulator live, which keeps registers low enough for two programs per SM)."""
    j = c * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    k_ptrs = k_kv + j[:, None] * D + d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=(j < LK)[:, None] & (d < D)[None, :], other=0.0)
    elif BLOCK_D == D:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=(d < D)[None, :], other=0.0)
    kt = tl.trans(k)
    k_scale = tl.load(ks_kv + c)
    _test_head(h0, kt, k_scale, j, q_pos, rows_ok, c, LK, SCALE, BLOCK, MASKED)
    if HEADS >= 2:
        _test_head(h1, kt, k_scale, j, q_pos, rows_ok, c, LK, SCALE, BLOCK, MASKED)
    if HEADS >= 4:
        _test_head(h2, kt, k_scale, j, q_pos, rows_ok, c, LK, SCALE, BLOCK, MASKED)
        _test_head(h3, kt, k_scale, j, q_pos, rows_ok, c, LK, SCALE, BLOCK, MASKED)


@triton.jit
def passing_tiles_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, row_ptr, col_ptr, need_ptr, out_ptr, LQ, LK, QB, KB,
                         D: tl.constexpr, HQ: tl.constexpr, GROUP: tl.constexpr, HEADS: tl.constexpr,
                         SCALE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                         STATIC_LOOP: tl.constexpr, KB_LOOP: tl.constexpr):
    """Program (query block, ``HEADS`` consecutive query heads of one KV head): ``out[head, r, c] = 1`` for
    each passing tile.

    ``q_ptr`` int8 ``[B*HQ, LQ, D]``, ``k_ptr`` fp16 ``[B*HKV, LK, D]``, ``out_ptr`` int8 ``[B*HQ, QB, KB]``
    zero-filled; the rest fp32: ``qs``, ``row``, ``need`` per query row, ``ks`` per key block, ``col`` per
    query head and key. ``KB_LOOP``: the static loop bound under the interpreter (unused otherwise).
    """
    tl.static_assert(HEADS == 1 or HEADS == 2 or HEADS == 4)
    r = QB - 1 - tl.program_id(0)  # heaviest (last) query blocks first
    bh0 = tl.program_id(1).to(tl.int64) * HEADS  # (bh * LQ + i) * D passes 2**31 at batch 4, 32 heads, 128K
    b = bh0 // HQ
    kv = (bh0 % HQ) // GROUP
    h0 = _head_rows(q_ptr, qs_ptr, row_ptr, need_ptr, col_ptr, out_ptr, bh0, r, LQ, LK, QB, KB, D, BLOCK, BLOCK_D)
    # Unused heads alias head 0 (compile-time choice: nothing is loaded for them).
    h1 = _head_rows(q_ptr, qs_ptr, row_ptr, need_ptr, col_ptr, out_ptr, bh0 + 1, r, LQ, LK, QB, KB, D, BLOCK,
                    BLOCK_D) if HEADS >= 2 else h0
    h2 = _head_rows(q_ptr, qs_ptr, row_ptr, need_ptr, col_ptr, out_ptr, bh0 + 2, r, LQ, LK, QB, KB, D, BLOCK,
                    BLOCK_D) if HEADS >= 4 else h0
    h3 = _head_rows(q_ptr, qs_ptr, row_ptr, need_ptr, col_ptr, out_ptr, bh0 + 3, r, LQ, LK, QB, KB, D, BLOCK,
                    BLOCK_D) if HEADS >= 4 else h0
    i = r * BLOCK + tl.arange(0, BLOCK)
    rows_ok = i < LQ
    off = LK - LQ  # queries are the last LQ positions
    q_pos = i + off
    k_kv = k_ptr + (b * (HQ // GROUP) + kv) * LK * D
    ks_kv = ks_ptr + (b * (HQ // GROUP) + kv) * KB
    # Key blocks [0, n_full) are visible to every query of the block (to its first query, always a real row;
    # they end before LK); [n_full, n_all) touch the diagonal or the end of the keys.
    n_full = tl.maximum(r * BLOCK + off + 1, 0) // BLOCK
    n_all = (tl.maximum(tl.minimum((r + 1) * BLOCK, LQ) + off, 0) + BLOCK - 1) // BLOCK
    if STATIC_LOOP:
        for c in range(0, KB_LOOP):
            if c < n_full:
                _test_block(h0, h1, h2, h3, q_pos, rows_ok, k_kv, ks_kv, c, LK, D, HEADS, SCALE, BLOCK, BLOCK_D,
                            False)
            elif c < n_all:
                _test_block(h0, h1, h2, h3, q_pos, rows_ok, k_kv, ks_kv, c, LK, D, HEADS, SCALE, BLOCK, BLOCK_D,
                            True)
    else:
        for c in range(0, n_full):
            _test_block(h0, h1, h2, h3, q_pos, rows_ok, k_kv, ks_kv, c, LK, D, HEADS, SCALE, BLOCK, BLOCK_D, False)
        for c in range(n_full, n_all):
            _test_block(h0, h1, h2, h3, q_pos, rows_ok, k_kv, ks_kv, c, LK, D, HEADS, SCALE, BLOCK, BLOCK_D, True)
