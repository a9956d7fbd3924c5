"""Token masks against brute-force neighbour lists written from NATTEN's definition, and the block maps /
full-tile maps that ``BlockPattern.from_token_mask`` derives from them."""

import itertools

import pytest
import torch

from dense_reference import block_map_of
from sparsa import BlockPattern, Neighborhood1D, Neighborhood2D, SinkWindow


# ------------------------------------------------------------------------------------- brute force (NATTEN)
def natten_axis(i, extent, kernel, dilation, causal):
    """Neighbours of position ``i`` on one axis of ``extent`` positions, straight from NATTEN's definition.

    Dilation splits the axis into ``dilation`` interleaved sub-sequences (index mod dilation); inside the
    query's sub-sequence the window is [p - k//2, ...] clamped into the sub-sequence (shifted at the borders,
    never truncated) or, causal, [max(p - k + 1, 0), p].
    """
    sub = list(range(i % dilation, extent, dilation))
    p = sub.index(i)
    if causal:
        lo, hi = max(p - kernel + 1, 0), p
    else:
        lo = min(max(p - kernel // 2, 0), len(sub) - kernel)
        assert lo >= 0
        hi = lo + kernel - 1
    return {sub[j] for j in range(lo, hi + 1)}


def brute_1d(q_len, kv_len, kernel, dilation, causal):
    m = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for qi in range(q_len):
        for kj in natten_axis(qi + kv_len - q_len, kv_len, kernel, dilation, causal):
            m[qi, kj] = True
    return m


def brute_2d(height, width, kernel, dilation):
    n = height * width
    m = torch.zeros(n, n, dtype=torch.bool)
    for y, x in itertools.product(range(height), range(width)):
        ys = natten_axis(y, height, kernel[0], dilation[0], False)
        xs = natten_axis(x, width, kernel[1], dilation[1], False)
        for ky, kx in itertools.product(ys, xs):
            m[y * width + x, ky * width + kx] = True
    return m


def brute_sink_window(q_len, kv_len, sink, window):
    m = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for qi in range(q_len):
        q = qi + kv_len - q_len
        for k in range(q + 1):
            m[qi, k] = k < sink or q - k < window
    return m


def apply_mask(mask, q_len, kv_len):
    q_pos = torch.arange(q_len)[:, None] + (kv_len - q_len)
    k_pos = torch.arange(kv_len)[None, :]
    return mask(q_pos, k_pos)


def causal_of(q_len, kv_len):
    return torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + (kv_len - q_len)


def touched_blocks(m, block_q, block_k):
    """[Qb, Kb]: tiles holding at least one visible pair."""
    q_len, kv_len = m.shape
    qb, kb = -(-q_len // block_q), -(-kv_len // block_k)
    out = torch.zeros(qb, kb, dtype=torch.bool)
    for r, c in itertools.product(range(qb), range(kb)):
        out[r, c] = bool(m[r * block_q:(r + 1) * block_q, c * block_k:(c + 1) * block_k].any())
    return out


def fully_visible_blocks(m, block_q, block_k):
    """[Qb, Kb]: tiles where every real query of the row sees every real key of the block."""
    q_len, kv_len = m.shape
    qb, kb = -(-q_len // block_q), -(-kv_len // block_k)
    out = torch.zeros(qb, kb, dtype=torch.bool)
    for r, c in itertools.product(range(qb), range(kb)):
        out[r, c] = bool(m[r * block_q:(r + 1) * block_q, c * block_k:(c + 1) * block_k].all())
    return out


def full_map_of(pattern):
    """[Qb, Kb] from the pattern's kv_full flags (batch and head dims are 1 for token-mask constructors)."""
    assert pattern.kv_full is not None and pattern.batch == 1 and pattern.heads == 1
    out = torch.zeros(pattern.num_q_blocks, pattern.num_kv_blocks, dtype=torch.bool)
    num, idx, full = pattern.kv_num_blocks[0, 0], pattern.kv_indices[0, 0], pattern.kv_full[0, 0]
    for r in range(pattern.num_q_blocks):
        for j in range(int(num[r])):
            out[r, int(idx[r, j])] = bool(full[r, j])
    return out


# ------------------------------------------------------------------------------------- token-level rules
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_neighborhood1d_matches_natten(causal, dilation):
    for kernel in (1, 2, 3, 4, 5, 6, 7):
        for kv_len, q_len in ((kernel * dilation, kernel * dilation), (23, 23), (23, 9), (30, 1)):
            if kv_len < kernel * dilation:
                continue
            mask = Neighborhood1D(kernel, dilation, causal, None if causal else kv_len)
            got = apply_mask(mask, q_len, kv_len)
            want = brute_1d(q_len, kv_len, kernel, dilation, causal)
            assert torch.equal(got, want), (kernel, dilation, causal, q_len, kv_len)
            if not causal:
                assert (got.sum(-1) == kernel).all()  # shifted at the borders, never truncated
            else:
                assert not (got & ~causal_of(q_len, kv_len)).any()
                assert got.sum(-1).max() == kernel


_GRIDS = [(5, 7), (8, 6), (9, 9), (10, 7)]
_KERNELS = [((3, 3), (1, 1)), ((4, 2), (1, 2)), ((2, 5), (2, 1)), ((3, 2), (3, 3)), ((5, 4), (2, 1))]


@pytest.mark.parametrize("grid,kernel,dilation", [
    (g, k, d) for g in _GRIDS for k, d in _KERNELS if g[0] >= k[0] * d[0] and g[1] >= k[1] * d[1]])
def test_neighborhood2d_matches_natten(grid, kernel, dilation):
    height, width = grid
    mask = Neighborhood2D(height, width, kernel, dilation)
    n = height * width
    got = apply_mask(mask, n, n)
    assert torch.equal(got, brute_2d(height, width, kernel, dilation))
    assert (got.sum(-1) == kernel[0] * kernel[1]).all()


def test_sink_window_rule():
    for q_len, kv_len, sink, window in ((20, 20, 4, 5), (7, 30, 3, 8), (15, 15, 0, 1), (12, 12, 20, 2)):
        got = apply_mask(SinkWindow(sink, window), q_len, kv_len)
        assert torch.equal(got, brute_sink_window(q_len, kv_len, sink, window))


def _masks_to_check():
    """(token mask, q_len, kv_len, causal for from_token_mask)."""
    cases = [
        (SinkWindow(4, 6), 29, 29, True),
        (SinkWindow(3, 5), 11, 37, True),
        (SinkWindow(0, 9), 20, 20, True),
        (SinkWindow(6, 4), 25, 25, False),
        (Neighborhood2D(6, 7, (3, 3), (1, 1)), 42, 42, False),
        (Neighborhood2D(7, 6, (2, 3), (2, 1)), 42, 42, False),
        (Neighborhood2D(6, 9, (3, 2), (1, 3)), 54, 54, False),
    ]
    for kernel, dilation in ((1, 1), (3, 1), (4, 1), (3, 2), (2, 3), (5, 2)):
        cases.append((Neighborhood1D(kernel, dilation, True), 19, 31, True))
        cases.append((Neighborhood1D(kernel, dilation, True), 26, 26, True))
        cases.append((Neighborhood1D(kernel, dilation, False, 31), 31, 31, False))
        cases.append((Neighborhood1D(kernel, dilation, False, 31), 17, 31, False))
    return cases


def _brute(mask, q_len, kv_len):
    if isinstance(mask, Neighborhood1D):
        return brute_1d(q_len, kv_len, mask.kernel, mask.dilation, mask.causal)
    if isinstance(mask, Neighborhood2D):
        return brute_2d(mask.height, mask.width, mask.kernel, mask.dilation)
    return brute_sink_window(q_len, kv_len, mask.sink, mask.window)


def _dilation(mask):
    if isinstance(mask, Neighborhood1D):
        return mask.dilation
    if isinstance(mask, Neighborhood2D):
        return mask.dilation[1]
    return 1


@pytest.mark.parametrize("case", _masks_to_check(), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{'c' if c[3] else 'nc'}")
def test_key_ranges_contract(case):
    """Ranges are sorted, disjoint and hold every visible key; with exact_ranges, only visible keys."""
    mask, q_len, kv_len, _ = case
    q_pos = torch.arange(q_len) + (kv_len - q_len)
    start, end = mask.key_ranges(q_pos, kv_len)
    brute = _brute(mask, q_len, kv_len)
    for qi in range(q_len):
        covered = torch.zeros(kv_len, dtype=torch.bool)
        prev_end = -1
        for s, e in zip(start[qi].tolist(), end[qi].tolist()):
            if s > e:
                continue
            assert s > prev_end, "ranges must be sorted and disjoint"
            prev_end = e
            lo, hi = max(s, 0), min(e, kv_len - 1)
            if lo <= hi:
                covered[lo:hi + 1] = True
        assert not (brute[qi] & ~covered).any(), f"query {qi}: a visible key lies outside the ranges"
        if mask.exact_ranges:
            assert torch.equal(covered, brute[qi]), f"query {qi}: exact ranges hold an invisible key"


@pytest.mark.parametrize("blocks", [(4, 4), (3, 5), (8, 2), (1, 3)])
@pytest.mark.parametrize("case", _masks_to_check(), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{'c' if c[3] else 'nc'}")
def test_from_token_mask_block_map_and_full_tiles(case, blocks):
    mask, q_len, kv_len, causal = case
    block_q, block_k = blocks
    pattern = BlockPattern.from_token_mask(mask, q_len, kv_len, causal=causal, block_q=block_q, block_k=block_k)
    pattern.validate()
    assert pattern.token_mask == mask
    brute = _brute(mask, q_len, kv_len)
    if causal:
        brute &= causal_of(q_len, kv_len)
    got = block_map_of(pattern)[0, 0]
    touched = touched_blocks(brute, block_q, block_k)
    if _dilation(mask) <= block_k:
        # every tile between two neighbours holds one of them: the map is exact
        assert torch.equal(got, touched)
    else:
        # a whole key block can fall between two dilated neighbours; the map may keep it (conservative)
        assert not (touched & ~got).any()

    full = full_map_of(pattern)
    truly_full = fully_visible_blocks(brute, block_q, block_k)
    assert not (full & ~truly_full).any(), "kv_full marks a tile that the token mask does not fully show"
    assert not (full & ~got).any()
    if isinstance(mask, Neighborhood1D) and mask.dilation == 1:
        # one range per query: every fully visible tile is found, except the partial key tail block
        whole = torch.arange(pattern.num_kv_blocks) * block_k + block_k <= kv_len
        assert torch.equal(full, truly_full & whole)


def test_sliding_window_constructor_matches_sink_window():
    """A causal, undilated window is SinkWindow(0, window): same tiles, same full tiles."""
    for q_len, kv_len, window, block in ((40, 40, 7, 8), (13, 50, 16, 4), (33, 33, 1, 5)):
        a = BlockPattern.sliding_window(q_len, kv_len, window=window, block_q=block)
        b = BlockPattern.streaming(q_len, kv_len, sink=0, window=window, block_q=block)
        assert torch.equal(a.to_block_mask(), b.to_block_mask())
        assert torch.equal(full_map_of(a), full_map_of(b))


def test_neighborhood_2d_constructor():
    pattern = BlockPattern.neighborhood_2d(6, 8, kernel_size=3, dilation=(1, 2), block_q=8, block_k=8)
    assert pattern.token_mask == Neighborhood2D(6, 8, (3, 3), (1, 2))
    brute = brute_2d(6, 8, (3, 3), (1, 2))
    assert torch.equal(block_map_of(pattern)[0, 0], touched_blocks(brute, 8, 8))
    assert pattern.density(causal=False) < 1.0


# ----------------------------------------------------------------------------------------------- errors
def test_noncausal_neighbourhood_too_short_raises():
    with pytest.raises(ValueError, match="kernel_size"):
        BlockPattern.sliding_window(8, window=3, dilation=3, causal=False, block_q=4)
    with pytest.raises(ValueError, match="kv_len"):
        BlockPattern.from_token_mask(Neighborhood1D(5, 2, False, 9), 9, 9, causal=False, block_q=4)
    # exactly kernel * dilation is allowed; causal windows have no lower bound
    BlockPattern.sliding_window(9, window=3, dilation=3, causal=False, block_q=4)
    BlockPattern.sliding_window(2, window=7, dilation=3, causal=True, block_q=4)


def test_mask_errors():
    with pytest.raises(ValueError, match="kernel_size"):
        Neighborhood1D(0)
    with pytest.raises(ValueError, match="dilation"):
        Neighborhood1D(3, 0)
    with pytest.raises(ValueError, match="extent"):
        Neighborhood1D(3, 1, causal=False)
    with pytest.raises(ValueError, match="extent"):  # the window shift needs the true key length
        BlockPattern.from_token_mask(Neighborhood1D(3, 1, False, 20), 10, 10, causal=False, block_q=4)
    with pytest.raises(ValueError, match="sink"):
        SinkWindow(-1, 4)
    with pytest.raises(ValueError, match="window"):
        SinkWindow(4, 0)
    with pytest.raises(ValueError, match="kernel_size"):
        Neighborhood2D(4, 4, (3, 0))
    with pytest.raises(ValueError, match="dilation"):
        Neighborhood2D(4, 4, (3, 3), (1, 0))
    with pytest.raises(ValueError, match="grid"):
        Neighborhood2D(0, 4, (1, 1))
    with pytest.raises(ValueError, match="height"):
        BlockPattern.neighborhood_2d(4, 8, kernel_size=3, dilation=(2, 1))
    with pytest.raises(ValueError, match="width"):
        BlockPattern.neighborhood_2d(8, 4, kernel_size=(3, 5))
    with pytest.raises(ValueError, match="height\\*width"):
        BlockPattern.from_token_mask(Neighborhood2D(4, 4, (3, 3)), 15, 16, causal=False, block_q=4)
