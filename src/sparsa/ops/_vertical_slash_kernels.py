"""Triton kernels behind ``sparsa.ops.vertical_slash`` (imported only when Triton is used).

Work is spread over (batch x head, probe tile, key split) programs so a few dozen heads still fill the GPU:
pass 1 writes each probe's partial softmax max and normaliser per key split (merged in PyTorch), pass 2 walks
its key tile for every probe tile. Lengths and the probe count are runtime arguments; loop bounds are
compile-time constants (``TILES`` key tiles per split, ``P_TILES`` probe tiles), as Triton's CPU interpreter
requires, so a new prompt length does not recompile.
"""

import triton
import triton.language as tl


@triton.jit
def _load_probes(q_ptr, pos_ptr, bh, p0, P, D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    p = p0 + tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + bh * P * D + p[:, None] * D + d[None, :], mask=(p < P)[:, None] & (d < D)[None, :],
                other=0.0)
    # Padding rows get position 0: they see key 0, so their softmax stays finite; they are never written.
    pos = tl.load(pos_ptr + p, mask=p < P, other=0)
    return q, pos, p


@triton.jit
def _logits(q, k_ptr, bias_ptr, bh, start, pos, LK, D: tl.constexpr, HQ: tl.constexpr,
            GROUP: tl.constexpr, SCALE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scaled logits (log2 units) of the probes against one key tile, -inf where not causally visible or
    padded (``bias`` is 0 or -inf per key)."""
    b = bh // HQ
    kv_head = (bh % HQ) // GROUP
    n = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    base = k_ptr + (b * (HQ // GROUP) + kv_head).to(tl.int64) * LK * D
    kt = tl.load(base + n[:, None] * D + d[None, :], mask=(n < LK)[:, None] & (d < D)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(kt)).to(tl.float32) * SCALE
    bias = tl.load(bias_ptr + b * LK + n, mask=n < LK, other=float("-inf"))
    visible = (n[None, :] <= pos[:, None]) & (n[None, :] < LK) & (bias[None, :] == 0)
    return tl.where(visible, s, float("-inf")), n, visible


@triton.jit
def stats_pass(q_ptr, k_ptr, pos_ptr, bias_ptr, max_ptr, sum_ptr, P, P_PAD, LK, D: tl.constexpr,
               HQ: tl.constexpr, GROUP: tl.constexpr, SCALE: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr):
    """Pass 1, program (head, probe tile, key split): the probes' softmax max and normaliser over the split's
    visible keys (online), stored at ``[head, probe, split]``."""
    bh = tl.program_id(0)
    p0 = tl.program_id(1) * BLOCK_P
    split = tl.program_id(2)
    nsplit = tl.num_programs(2)
    q, pos, p = _load_probes(q_ptr, pos_ptr, bh, p0, P, D, BLOCK_P, BLOCK_D)
    last = tl.max(pos, 0)
    row_max = tl.full([BLOCK_P], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_P], tl.float32)
    for t in range(0, TILES):
        start = (split * TILES + t) * BLOCK_N
        if start <= last:  # past every probe's position (or the key length) nothing is visible
            s, n, visible = _logits(q, k_ptr, bias_ptr, bh, start, pos, LK, D, HQ, GROUP, SCALE, BLOCK_D, BLOCK_N)
            new_max = tl.maximum(row_max, tl.max(s, 1))
            # Until a probe has seen a real key its max is -inf: keep the arithmetic finite (0 * exp2(0)).
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            row_sum = row_sum * tl.exp2(row_max - safe) + tl.sum(tl.exp2(s - safe[:, None]), 1)
            row_max = new_max
    out = (bh * P_PAD + p) * nsplit + split
    tl.store(max_ptr + out, row_max, mask=p < P_PAD)
    tl.store(sum_ptr + out, row_sum, mask=p < P_PAD)


@triton.jit
def column_pass(q_ptr, k_ptr, pos_ptr, bias_ptr, max_ptr, sum_ptr, vert_ptr, slash_ptr, P, P_PAD, LK, SLASH_LEN,
                D: tl.constexpr, HQ: tl.constexpr, GROUP: tl.constexpr, SCALE: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, P_TILES: tl.constexpr,
                SLASH_BLOCK: tl.constexpr):
    """Pass 2, program (head, key tile): normalised probabilities of every probe tile over the key tile;
    column sums stored, diagonal sums added atomically -- per diagonal (``SLASH_BLOCK`` 1), or per band of
    ``SLASH_BLOCK`` diagonals, where a tile of consecutive probes touches at most three bands: three sums and
    three atomics instead of one atomic per probability."""
    bh = tl.program_id(0)
    start = tl.program_id(1) * BLOCK_N
    col = tl.zeros([BLOCK_N], tl.float32)
    for t in range(0, P_TILES):
        q, pos, p = _load_probes(q_ptr, pos_ptr, bh, t * BLOCK_P, P, D, BLOCK_P, BLOCK_D)
        if start <= tl.max(tl.where(p < P, pos, -1), 0):
            row_max = tl.load(max_ptr + bh * P_PAD + p, mask=p < P_PAD, other=0.0)
            row_sum = tl.load(sum_ptr + bh * P_PAD + p, mask=p < P_PAD, other=0.0)
            s, n, visible = _logits(q, k_ptr, bias_ptr, bh, start, pos, LK, D, HQ, GROUP, SCALE, BLOCK_D,
                                    BLOCK_N)
            keep = visible & (p < P)[:, None] & (row_sum > 0)[:, None]
            prob = tl.where(keep, tl.exp2(s - row_max[:, None]) / row_sum[:, None], 0.0)
            col += tl.sum(prob, 0)
            offset = pos[:, None] - n[None, :]
            if SLASH_BLOCK == 1:
                tl.atomic_add(slash_ptr + bh * SLASH_LEN + offset, prob, mask=keep)
            else:
                band = tl.where(keep, offset, 0) // SLASH_BLOCK
                low = tl.min(tl.where(keep, band, 1 << 30))
                for j in range(0, 3):
                    part = tl.sum(tl.sum(tl.where(keep & (band == low + j), prob, 0.0), 1), 0)
                    tl.atomic_add(slash_ptr + bh * SLASH_LEN + low + j, part, mask=part > 0)
                # Scattered probes can reach further bands: those go one by one.
                tl.atomic_add(slash_ptr + bh * SLASH_LEN + band, prob, mask=keep & (band > low + 2))
    n = start + tl.arange(0, BLOCK_N)
    tl.store(vert_ptr + bh * LK + n, col, mask=n < LK)
