"""Triton kernels behind ``sparsa.ops.vertical_slash_blocks`` (imported only when Triton is used).

Two launches: ``select_lines_kernel`` (one program per batch x head) ranks the column and band scores and writes
which key blocks and which diagonal bands are selected; ``tiles_kernel`` (one program per batch x head x query
block) turns those flags into the row's tiles and compacts them into an index list. The row width is rounded up to
a power of two (``KB_P2``, a compile-time size), so a new prompt length recompiles only when the block count
crosses one.
"""

import triton
import triton.language as tl

from ._compact import rank_key, store_row


@triton.jit
def _top_flags(s, j, in_row, count, forced, KB, KB_P2: tl.constexpr):
    """The ``count`` highest of ``s`` (ties to the lower index, as a stable descending sort) plus ``j < forced``."""
    # torch.sort ranks -0.0 with 0.0 and every NaN above +inf; the bit pattern would not, so canonicalise both.
    s = tl.where(s == 0.0, 0.0, s)
    s = tl.where(s != s, float("nan"), s)
    key = tl.where(in_row, rank_key(s, j, KB_P2), -9223372036854775807 - 1)  # the lower index wins a tie
    count = tl.minimum(tl.maximum(count, 0), KB)
    ranked = tl.sort(key, 0, descending=True)
    kth = tl.sum(tl.where(j == count - 1, ranked, 0), 0)  # the count-th largest key
    picked = in_row & (key >= kth) & (count > 0)
    return picked | (in_row & (j < forced))


@triton.jit
def select_lines_kernel(col_ptr, band_ptr, col_flag_ptr, band_flag_ptr, n_col_ptr, n_band_ptr, H, KB,
                        c_b, c_h, d_b, d_h, nc_b, nc_h, nd_b, nd_h, N_COL, N_BAND, FORCED_COL, FORCED_BAND,
                        COL_PER_HEAD: tl.constexpr, BAND_PER_HEAD: tl.constexpr, KB_P2: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    h = bh % H
    b = bh // H
    j = tl.arange(0, KB_P2)
    in_row = j < KB
    # Budgets: one per head (FlexPrefill) or one for all (MInference).
    if COL_PER_HEAD:
        n_col = tl.minimum(tl.maximum(tl.load(n_col_ptr + b * nc_b + h * nc_h), 0), KB).to(tl.int32)
    else:
        n_col = N_COL
    if BAND_PER_HEAD:
        n_band = tl.minimum(tl.maximum(tl.load(n_band_ptr + b * nd_b + h * nd_h), 0), KB).to(tl.int32)
    else:
        n_band = N_BAND
    s = tl.load(col_ptr + b * c_b + h * c_h + j, mask=in_row, other=0.0).to(tl.float32)
    col = _top_flags(s, j, in_row, n_col, FORCED_COL, KB, KB_P2)
    tl.store(col_flag_ptr + bh * KB + j, col.to(tl.uint8), mask=in_row)
    s = tl.load(band_ptr + b * d_b + h * d_h + j, mask=in_row, other=0.0).to(tl.float32)
    band = _top_flags(s, j, in_row, n_band, FORCED_BAND, KB, KB_P2)
    tl.store(band_flag_ptr + bh * KB + j, band.to(tl.uint8), mask=in_row)


@triton.jit
def tiles_kernel(col_flag_ptr, band_flag_ptr, extra_ptr, num_ptr, idx_ptr, QB, KB, BQ, BK, Q_LEN, OFFSET,
                 HAS_EXTRA: tl.constexpr, TWO_TILES: tl.constexpr, KB_P2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    r = row % QB
    bh = row // QB
    j = tl.arange(0, KB_P2)
    in_row = j < KB
    # the key block that holds the last key this query block's last query can see
    last = (tl.minimum((r + 1) * BQ, Q_LEN) - 1 + OFFSET) // BK
    visible = in_row & (j <= last)
    # Band d holds token diagonals d*BK .. (d+1)*BK - 1; it crosses this row in key blocks last - d and the one
    # before. Tile j is on a selected band when band d = last - j is selected, or (TWO_TILES) band d - 1.
    d = last - j
    on_col = tl.load(col_flag_ptr + bh * KB + j, mask=visible, other=0) != 0
    on_band = tl.load(band_flag_ptr + bh * KB + d, mask=visible, other=0) != 0
    if TWO_TILES:
        on_band |= tl.load(band_flag_ptr + bh * KB + d - 1, mask=visible & (d >= 1), other=0) != 0
    keep = visible & (on_col | on_band)
    if HAS_EXTRA:
        keep |= tl.load(extra_ptr + row * KB + j, mask=in_row, other=0) != 0
    # the sink block and the diagonal block: no query is left without a key
    keep |= in_row & ((j == 0) | (j == last))
    store_row(keep, j, idx_ptr, num_ptr, row, KB, KB_P2)
