"""Triton kernel behind ``sparsa.ops.sale_estimate`` (imported only when Triton is used).

Lengths are runtime arguments, so a new prompt length does not recompile; the loop over key blocks runs to
``KB_LOOP`` (the block count rounded up to a power of two: a compile-time bound, as Triton's CPU interpreter
requires) and skips blocks after the query block's last key.
"""

import triton
import triton.language as tl


@triton.jit
def passing_tiles_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, row_ptr, col_ptr, need_ptr, out_ptr, LQ, LK,
                         D: tl.constexpr, HQ: tl.constexpr, GROUP: tl.constexpr, KB,
                         SCALE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, KB_LOOP: tl.constexpr):
    """One program per (batch x query head, query block): test every causally visible key block."""
    bh = tl.program_id(0).to(tl.int64)  # (bh * LQ + i) * D passes 2**31 at batch 4, 32 heads, 128K tokens
    r = tl.program_id(1)
    b = bh // HQ
    kv = (bh % HQ) // GROUP
    i = r * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    rows_ok = i < LQ
    q = tl.load(q_ptr + (bh * LQ + i[:, None]) * D + d[None, :], mask=rows_ok[:, None] & (d < D)[None, :], other=0)
    q_scale = tl.load(qs_ptr + bh * LQ + i, mask=rows_ok, other=0.0)
    row = tl.load(row_ptr + bh * LQ + i, mask=rows_ok, other=0.0)
    need = tl.load(need_ptr + bh * LQ + i, mask=rows_ok, other=float("inf"))
    q_pos = i + (LK - LQ)
    last_key = tl.minimum((r + 1) * BLOCK, LQ) - 1 + (LK - LQ)
    k_base = k_ptr + (b * (HQ // GROUP) + kv) * LK * D
    for c in range(0, KB_LOOP):
        # Only key blocks at or before the block's last query (a scalar test, so the loop bound stays static:
        # Triton's CPU interpreter needs static bounds).
        if c * BLOCK <= last_key:
            j = c * BLOCK + tl.arange(0, BLOCK)
            cols_ok = j < LK
            k = tl.load(k_base + j[:, None] * D + d[None, :], mask=cols_ok[:, None] & (d < D)[None, :], other=0)
            # Integer values in fp16, fp32 accumulation: exact (|q.k| <= 127 * 127 * D < 2**24). An int8 x int8
            # dot faulted on the H200 (cudaErrorInvalidAddressSpace, triton 3.6, 2026-11-29).
            dots = tl.dot(q.to(tl.float16), tl.trans(k.to(tl.float16)), out_dtype=tl.float32)
            k_scale = tl.load(ks_ptr + (b * (HQ // GROUP) + kv) * KB + c)
            col = tl.load(col_ptr + bh * LK + j, mask=cols_ok, other=0.0)
            est = (dots * q_scale[:, None] * k_scale + row[:, None] + col[None, :]) * SCALE
            hit = (est >= need[:, None]) & (j[None, :] <= q_pos[:, None]) & rows_ok[:, None] & cols_ok[None, :]
            passed = tl.max(tl.max(hit.to(tl.int32), 1), 0)
            tl.store(out_ptr + (bh * ((LQ + BLOCK - 1) // BLOCK) + r) * KB + c, passed.to(tl.int8))
