"""Triton kernels behind ``sparsa.ops.vertical_slash`` (imported only when Triton is used).

Lengths and the probe count are runtime arguments, so a new prompt length does not recompile; the one loop
over key tiles runs to ``LK_LOOP``, the key length rounded up to a power of two (a compile-time bound, as
Triton's CPU interpreter requires), and skips tiles past the real length.
"""

import triton
import triton.language as tl


@triton.jit
def _load_probes(q_ptr, pos_ptr, bh, P, D: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + bh * P * D + p[:, None] * D + d[None, :], mask=(p < P)[:, None] & (d < D)[None, :],
                other=0.0)
    # Padding rows get position 0: they see key 0, so their softmax stays finite; they are never written.
    pos = tl.load(pos_ptr + p, mask=p < P, other=0)
    return q, pos


@triton.jit
def _logits(q, k_ptr, bias_ptr, bh, start, pos, LK, D: tl.constexpr, HQ: tl.constexpr,
            GROUP: tl.constexpr, SCALE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scaled logits (log2 units) of the probes against one key tile, -inf where not causally visible or
    padded (``bias`` is 0 or -inf per key)."""
    b = bh // HQ
    kv_head = (bh % HQ) // GROUP
    n = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    base = k_ptr + (b * (HQ // GROUP) + kv_head) * LK * D
    kt = tl.load(base + n[:, None] * D + d[None, :], mask=(n < LK)[:, None] & (d < D)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(kt)).to(tl.float32) * SCALE
    bias = tl.load(bias_ptr + b * LK + n, mask=n < LK, other=float("-inf"))
    visible = (n[None, :] <= pos[:, None]) & (n[None, :] < LK) & (bias[None, :] == 0)
    return tl.where(visible, s, float("-inf")), n, visible


@triton.jit
def stats_pass(q_ptr, k_ptr, pos_ptr, bias_ptr, max_ptr, sum_ptr, P, D: tl.constexpr, LK,
               HQ: tl.constexpr, GROUP: tl.constexpr, SCALE: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, LK_LOOP: tl.constexpr):
    """Pass 1: each probe's softmax max and normaliser over all visible keys (online, one tile at a time)."""
    bh = tl.program_id(0)
    q, pos = _load_probes(q_ptr, pos_ptr, bh, P, D, BLOCK_P, BLOCK_D)
    row_max = tl.full([BLOCK_P], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_P], tl.float32)
    for start in range(0, LK_LOOP, BLOCK_N):
        if start < LK:
            s, n, visible = _logits(q, k_ptr, bias_ptr, bh, start, pos, LK, D, HQ, GROUP, SCALE, BLOCK_D, BLOCK_N)
            new_max = tl.maximum(row_max, tl.max(s, 1))
            # Until a probe has seen a real key its max is -inf: keep the arithmetic finite (0 * exp2(0)).
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            row_sum = row_sum * tl.exp2(row_max - safe) + tl.sum(tl.exp2(s - safe[:, None]), 1)
            row_max = new_max
    p = tl.arange(0, BLOCK_P)
    tl.store(max_ptr + bh * BLOCK_P + p, row_max)
    tl.store(sum_ptr + bh * BLOCK_P + p, row_sum)


@triton.jit
def column_pass(q_ptr, k_ptr, pos_ptr, bias_ptr, max_ptr, sum_ptr, vert_ptr, slash_ptr, P, D: tl.constexpr,
                LK, HQ: tl.constexpr, GROUP: tl.constexpr, SCALE: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, LK_LOOP: tl.constexpr):
    """Pass 2: normalised probabilities of one key tile; column sums stored, diagonal sums added atomically."""
    bh = tl.program_id(0)
    start = tl.program_id(1) * BLOCK_N
    q, pos = _load_probes(q_ptr, pos_ptr, bh, P, D, BLOCK_P, BLOCK_D)
    p = tl.arange(0, BLOCK_P)
    row_max = tl.load(max_ptr + bh * BLOCK_P + p)
    row_sum = tl.load(sum_ptr + bh * BLOCK_P + p)
    s, n, visible = _logits(q, k_ptr, bias_ptr, bh, start, pos, LK, D, HQ, GROUP, SCALE, BLOCK_D, BLOCK_N)
    keep = visible & (p < P)[:, None] & (row_sum > 0)[:, None]
    prob = tl.where(keep, tl.exp2(s - row_max[:, None]) / row_sum[:, None], 0.0)
    tl.store(vert_ptr + bh * LK + n, tl.sum(prob, 0), mask=n < LK)
    offset = pos[:, None] - n[None, :]
    tl.atomic_add(slash_ptr + bh * LK + offset, prob, mask=keep)
