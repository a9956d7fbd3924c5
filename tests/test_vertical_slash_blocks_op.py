"""The vertical-slash block selection op: Triton kernels (interpreted on the CPU) against the PyTorch reference,
the reference against the chain the selectors ran before, and against the definition written out per row."""

import os

import pytest
import torch

from sparsa.ops.vertical_slash import triton_available
from sparsa.ops.vertical_slash_blocks import vertical_slash_blocks, vertical_slash_blocks_naive
from sparsa.pattern import BlockPattern
from sparsa.prefill.estimate import band_tiles, force_sink_and_diagonal, rank_of

needs_triton = pytest.mark.skipif(not triton_available() or (not torch.cuda.is_available()
                                                             and os.environ.get("TRITON_INTERPRET") != "1"),
                                  reason="needs triton, and a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

CASES = [  # batch, heads, q_len, kv_len, block, n_columns, n_bands, forced_columns, forced_bands
    (2, 3, 100, 100, 16, 2, 3, 1, 2),
    (2, 3, 70, 200, 16, 4, 2, 0, 0),  # prefix keys (chunked prefill), lengths not multiples of the block
    (2, 3, 256, 256, 32, 20, 30, 1, 1),  # budgets above the block count: every line
    (1, 2, 33, 33, 16, 0, 0, 0, 0),  # no lines at all: sink and diagonal only
    (2, 3, 500, 1000, 64, 5, 3, 2, 3),
    (1, 2, 40, 2100, 16, 7, 9, 1, 2),  # 132 key blocks: a 256-wide row in the kernels
    (2, 3, 1, 300, 16, 3, 2, 1, 1),  # one query (decode-like)
]


def random_inputs(case, seed, per_head=False, extra=False):
    b, h, lq, lk, block, n_col, n_band = case[:7]
    g = torch.Generator().manual_seed(seed)
    qb, kb = -(-lq // block), -(-lk // block)
    col, band = torch.rand(b, h, kb, generator=g), torch.rand(b, h, kb, generator=g)
    col[-1, -1, :3] = 0.5  # ties: the lower index wins
    band[0, 0, 1:4] = 0.25
    if per_head:  # FlexPrefill's per-head budgets, [B, H, 1], some above Kb and some 0
        n_col = torch.randint(0, kb + 3, (b, h, 1), generator=g)
        n_band = torch.randint(0, kb + 3, (b, h, 1), generator=g)
    tiles = None
    if extra:
        from sparsa.pattern import causal_block_mask

        tiles = (torch.rand(b, h, qb, kb, generator=g) < 0.2) & causal_block_mask(lq, lk, block, block)
        tiles[0, 0] = False  # a head that is not query-aware
    return col, band, n_col, n_band, tiles


def call(case, inputs, backend, band_tiles=2):
    b, h, lq, lk, block, _, _, forced_col, forced_band = case
    col, band, n_col, n_band, extra = inputs
    if backend == "naive-direct":
        return vertical_slash_blocks_naive(col, band, n_col, n_band, forced_columns=forced_col,
                                           forced_bands=forced_band, q_len=lq, kv_len=lk, block=block,
                                           extra_tiles=extra, band_tiles=band_tiles)
    to = (lambda x: x.to(DEVICE) if isinstance(x, torch.Tensor) else x)
    return vertical_slash_blocks(to(col), to(band), to(n_col), to(n_band), forced_columns=forced_col,
                                 forced_bands=forced_band, q_len=lq, kv_len=lk, block=block, extra_tiles=to(extra),
                                 band_tiles=band_tiles, backend=backend)


def old_chain(case, inputs):
    """The selection as vertical_slash.select / flexprefill.select computed it before the op (unstable sorts)."""
    b, h, lq, lk, block, _, _, forced_col, forced_band = case
    col, band, n_col, n_band, extra = inputs

    def top(scores, count, forced):
        keep = rank_of(torch.argsort(scores, dim=-1, descending=True)) < count
        keep[..., :forced] = True
        return keep

    tiles = band_tiles(top(col, n_col, forced_col), top(band, n_band, forced_band), lq, lk, block)
    if extra is not None:
        tiles = tiles | extra
    tiles = force_sink_and_diagonal(tiles, lq, lk, block, block)
    pattern = BlockPattern.from_block_mask(tiles, q_len=lq, kv_len=lk, block_q=block)
    return pattern.kv_num_blocks, pattern.kv_indices


def by_definition(case, inputs, band_tiles=2):
    """Each row's blocks written out with Python sets, as the module docstring states the selection."""
    b, h, lq, lk, block, _, _, forced_col, forced_band = case
    col, band, n_col, n_band, extra = inputs
    qb, kb = -(-lq // block), -(-lk // block)

    def top(scores, count, forced):
        order = sorted(range(kb), key=lambda j: (-scores[j].item(), j))
        return set(order[:max(int(count), 0)]) | set(range(min(forced, kb)))

    rows = {}
    for bi in range(b):
        for hi in range(h):
            count = (lambda n: n[bi, hi, 0] if isinstance(n, torch.Tensor) else n)
            cols = top(col[bi, hi], count(n_col), forced_col)
            bands = top(band[bi, hi], count(n_band), forced_band)
            for r in range(qb):
                last = (min((r + 1) * block, lq) - 1 + lk - lq) // block
                keep = {j for j in range(last + 1)
                        if j in cols or (last - j) in bands or (band_tiles == 2 and (last - j - 1) in bands)}
                if extra is not None:
                    keep |= {j for j in range(kb) if extra[bi, hi, r, j]}
                rows[bi, hi, r] = sorted(keep | {0, last})
    return rows


@pytest.mark.parametrize("case", CASES[:4])
@pytest.mark.parametrize("per_head,extra,band_tiles", [(False, False, 2), (True, True, 2), (False, False, 1),
                                                       (True, True, 1)])
def test_naive_matches_definition(case, per_head, extra, band_tiles):
    inputs = random_inputs(case, 1, per_head, extra)
    num, idx = call(case, inputs, "naive-direct", band_tiles)
    for (bi, hi, r), want in by_definition(case, inputs, band_tiles).items():
        n = num[bi, hi, r].item()
        assert idx[bi, hi, r, :n].tolist() == want
        assert not idx[bi, hi, r, n:].any()  # the rest of the row is zero, as BlockPattern's lists are


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("per_head,extra", [(False, False), (True, True)])
def test_naive_matches_the_old_chain(case, per_head, extra):
    inputs = list(random_inputs(case, 4, per_head, extra))
    g = torch.Generator().manual_seed(5)
    # fresh normal scores: no ties, where the old unstable sorts could pick either
    inputs[0], inputs[1] = torch.randn(inputs[0].shape, generator=g), torch.randn(inputs[1].shape, generator=g)
    want, got = old_chain(case, inputs), call(case, inputs, "naive-direct")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("per_head,extra,band_tiles", [(False, False, 2), (True, False, 1), (True, True, 2)])
def test_triton_matches_naive(case, per_head, extra, band_tiles):
    wide = -(-case[3] // case[4]) > 64  # slow to sort in the interpreter: one seed
    for seed in (2,) if wide else (2, 3):  # fresh random scores
        inputs = random_inputs(case, seed, per_head, extra)
        want, got = call(case, inputs, "naive", band_tiles), call(case, inputs, "triton", band_tiles)
        assert torch.equal(got[0].cpu(), want[0].cpu()) and torch.equal(got[1].cpu(), want[1].cpu())


@needs_triton
def test_triton_reads_strided_low_precision_scores_and_ties():
    case = (2, 2, 100, 150, 16, 3, 2, 1, 1)
    kb = -(-150 // 16)
    scores = torch.randn(2, 4, kb).to(DEVICE)
    tied = torch.zeros(2, 2, kb, device=DEVICE)  # all ties, with -0.0 among them: the lowest indices win
    tied[0, 0, 5] = -0.0
    for col, band in ((scores[:, ::2], scores[:, 1::2]), (scores[:, ::2].bfloat16(), tied), (tied, -tied)):
        inputs = (col, band, 3, torch.tensor([[1], [4]], device=DEVICE), None)  # a budget broadcast over heads
        want, got = call(case, inputs, "naive"), call(case, inputs, "triton")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_arguments_are_named():
    col = torch.zeros(1, 2, 7)
    kw = dict(q_len=100, kv_len=100, block=16)
    with pytest.raises(ValueError, match="column_scores must be"):
        vertical_slash_blocks(torch.zeros(1, 2, 6), col, 1, 1, **kw)
    with pytest.raises(ValueError, match="same shape"):
        vertical_slash_blocks(col, torch.zeros(2, 2, 7), 1, 1, **kw)
    with pytest.raises(ValueError, match="n_bands must"):
        vertical_slash_blocks(col, col, 1, torch.ones(3, 1, dtype=torch.long), **kw)
    with pytest.raises(ValueError, match="n_columns must"):
        vertical_slash_blocks(col, col, 1.5, 1, **kw)
    with pytest.raises(ValueError, match="forced_bands must"):
        vertical_slash_blocks(col, col, 1, 1, forced_bands=-1, **kw)
    with pytest.raises(ValueError, match="extra_tiles must"):
        vertical_slash_blocks(col, col, 1, 1, extra_tiles=torch.zeros(1, 2, 7, 7), **kw)
    with pytest.raises(ValueError, match="backend must be"):
        vertical_slash_blocks(col, col, 1, 1, backend="cuda", **kw)
