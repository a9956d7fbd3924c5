"""Triton kernels behind ``sparsa.ops.vertical_slash`` (imported only when Triton is used).

Work is spread over (batch x head, probe tile, key split) programs so a few dozen heads still fill the GPU:
pass 1 writes each probe's partial softmax max and normaliser per key split (merged in PyTorch), pass 2 walks
the same split again and adds the normalised probabilities to the column and diagonal sums. Lengths and the
probe count are runtime arguments; loop bounds are compile-time constants (``TILES`` key tiles per split), as
Triton's CPU interpreter requires, so a new prompt length does not recompile.
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
                BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr,
                SLASH_BLOCK: tl.constexpr, COL_PARTIALS: tl.constexpr):
    """Pass 2, program (head, probe tile, key split), the layout of pass 1: the probe tile is loaded once and
    walks the split's key tiles. Normalised probabilities; column sums added atomically (the probe tiles of a
    head share them) or, with ``COL_PARTIALS``, stored per probe tile (``vert_ptr`` then holds ``[probe tiles,
    B * Hq, LK]``, summed by the caller: no atomics, and the same sums every run); diagonal sums added
    atomically -- per diagonal (``SLASH_BLOCK`` 1), or per band of ``SLASH_BLOCK``
    diagonals: a tile of consecutive probes meets at most three bands of a key tile, so up to three sums and three
    atomics (the last sum by subtraction); only scattered probes fall back to one atomic per probability.

    (Session 8: the first version ran one program per key tile over every probe tile, reloading the probes and
    issuing the per-probability atomics predicated off; at 512 probes it took 3.5 ms at 32K on the H200, 8x the
    same arithmetic in pass 1.)"""
    bh = tl.program_id(0)
    p0 = tl.program_id(1) * BLOCK_P
    split = tl.program_id(2)
    q, pos, p = _load_probes(q_ptr, pos_ptr, bh, p0, P, D, BLOCK_P, BLOCK_D)
    real = p < P
    first = tl.min(tl.where(real, pos, 1 << 30), 0)
    last = tl.max(tl.where(real, pos, -1), 0)
    row_max = tl.load(max_ptr + bh * P_PAD + p, mask=p < P_PAD, other=0.0)
    row_sum = tl.load(sum_ptr + bh * P_PAD + p, mask=p < P_PAD, other=0.0)
    # 1 / normaliser, 0 for padding rows and rows that saw no key (one division per row, not per probability)
    inv = tl.where(real & (row_sum > 0), 1.0 / tl.where(row_sum > 0, row_sum, 1.0), 0.0)
    for t in range(0, TILES):
        start = (split * TILES + t) * BLOCK_N
        if start <= last:
            s, n, visible = _logits(q, k_ptr, bias_ptr, bh, start, pos, LK, D, HQ, GROUP, SCALE, BLOCK_D,
                                    BLOCK_N)
            keep = visible & real[:, None]
            prob = tl.where(keep, tl.exp2(s - row_max[:, None]), 0.0) * inv[:, None]
            col = tl.sum(prob, 0)
            if COL_PARTIALS:
                tile_row = tl.program_id(1) * tl.num_programs(0) + bh
                tl.store(vert_ptr + tile_row.to(tl.int64) * LK + n, col, mask=n < LK)
            else:
                tl.atomic_add(vert_ptr + bh * LK + n, col, mask=n < LK)
            offset = pos[:, None] - n[None, :]
            if SLASH_BLOCK == 1:
                tl.atomic_add(slash_ptr + bh * SLASH_LEN + offset, prob, mask=keep)
            else:
                band = tl.where(keep, offset, 0) // SLASH_BLOCK
                low = tl.maximum(first - (start + BLOCK_N - 1), 0) // SLASH_BLOCK
                high = (last - start) // SLASH_BLOCK
                if high <= low + 2:
                    # Two or three bands: the last one's sum is the tile's total less the others' (one masked
                    # reduction of the tile fewer; the total comes from the column sums already made).
                    rest = tl.sum(col, 0)
                    for j in range(0, 2):
                        if low + j < high:
                            part = tl.sum(tl.sum(tl.where(keep & (band == low + j), prob, 0.0), 1), 0)
                            tl.atomic_add(slash_ptr + bh * SLASH_LEN + low + j, part, mask=part > 0)
                            rest -= part
                    rest = tl.maximum(rest, 0.0)
                    tl.atomic_add(slash_ptr + bh * SLASH_LEN + high, rest, mask=(rest > 0) & (high < SLASH_LEN))
                else:  # scattered probes: one atomic per probability
                    tl.atomic_add(slash_ptr + bh * SLASH_LEN + band, prob, mask=keep)
