"""HiP with Quest-bound node scoring (``scoring="bound"``, the default): exact at a full budget, finds a needle key
that the centre token misses, its sparse table agrees with a brute-force max/min, padding and GQA stay valid."""

import pytest
import torch

from dense_reference import dense_attention, token_mask_of
from selector_checks import check_rows, dense_causal, random_qkv
from sparsa.ops import block_sparse_attention
from sparsa.pattern import last_visible_block
from sparsa.prefill.hip import HiP, bound_table, node_bounds


@pytest.mark.parametrize("lq,lk,group", [(333, 333, 1), (300, 700, 2), (77, 1000, 4)])
def test_full_budget_is_dense(lq, lk, group):
    q, k, v = random_qkv(2, 2 * group, 2, lq, lk, seed=group)
    pattern = HiP(block=16, mask_k=lk, sliding_window=16, sink=4).select(q, k)
    check_rows(pattern)
    assert pattern.density() == 1.0
    out = block_sparse_attention(q, k, v, pattern, backend="reference")
    assert (out.double() - dense_causal(q, k, v)).abs().max() <= 1e-5


def test_small_budget_is_sparse_and_exact_on_its_pattern():
    q, k, v = random_qkv(2, 4, 2, 300, 700, seed=11)
    pattern = HiP(block=16, mask_k=32, sliding_window=16, sink=4).select(q, k)
    check_rows(pattern)
    assert pattern.density() < 0.5
    out = block_sparse_attention(q, k, v, pattern, backend="reference")
    assert (out.double() - dense_causal(q, k, v)).abs().max() > 1e-3
    mask = token_mask_of(pattern, 2, 4, 2, causal=True)
    assert (out.double() - dense_attention(q, k, v, mask)[0]).abs().max() <= 1e-5


def test_finds_a_needle_key():
    """One key, off-centre in a far block, aligned with the last query block's queries: the bound raises every node
    holding it, so the search reaches its block; the centre token never sees it."""
    lq = lk = 1024
    bs, dim, c = 16, 32, 9
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, lq, dim, generator=g)
    k = torch.randn(1, 1, lk, dim, generator=g)
    u = torch.randn(dim, generator=g)
    q[:, :, -bs:] += 3 * u
    k[0, 0, c * bs + 3] = 20 * u  # a needle in block c, not at a centre token of any node
    r = lq // bs - 1
    rows = {}
    for scoring in ("bound", "centre"):
        pattern = HiP(block=bs, mask_k=2 * bs, sliding_window=bs, sink=4, scoring=scoring).select(q, k)
        check_rows(pattern)
        rows[scoring] = pattern.to_block_mask()[0, 0, r]
    assert bool(rows["bound"][c])
    assert int(rows["bound"].sum()) == 1 + 2 + 2  # sink, two searched blocks, window and diagonal
    # the centre token misses it here (informative: HiP's locality assumption does not hold for a needle)
    print("centre picked the needle block:", bool(rows["centre"][c]))


@pytest.mark.parametrize("padded", [False, True])
def test_node_bounds_match_brute_force(padded):
    batch, heads, length, dim, bs = 2, 3, 500, 8, 16
    g = torch.Generator().manual_seed(7)
    k = torch.randn(batch, heads, length, dim, generator=g)
    real = None
    if padded:
        real = torch.rand(batch, length, generator=g) < 0.6
        real[1, :150] = False  # left padding: blocks 0-8 padding only
    kb = -(-length // bs)
    widest = 20
    table = bound_table(k, bs, real, widest)
    assert table.shape[2] == 5  # 2^4 <= 20 < 2^5
    lo = torch.randint(0, kb, (batch, heads, 300), generator=g)
    hi = (lo + torch.randint(1, widest + 1, lo.shape, generator=g)).clamp(max=kb)
    got = node_bounds(table, torch.stack((lo, hi), -1))
    checked = 0
    for b in range(batch):
        for h in range(heads):
            for i in range(lo.shape[-1]):
                a, z = int(lo[b, h, i]) * bs, min(int(hi[b, h, i]) * bs, length)
                keys = k[b, h, a:z]
                if real is not None:
                    keys = keys[real[b, a:z]]
                if len(keys) == 0:
                    assert bool((got[b, h, i] <= -3e38).all())  # a node of padding only stays dead
                    continue
                want = torch.cat((keys.amax(0), -keys.amin(0)))
                assert torch.equal(got[b, h, i], want)
                checked += 1
    assert checked > 500


def test_padding_gqa_prefix_and_ragged_length():
    """Batch 2 (left padding in the second), 8 query heads on 2 KV heads, queries after a key prefix, a length
    that is not a multiple of the block: a valid pattern; padded-only blocks never searched into the pattern."""
    lq, lk, bs, n_pad = 250, 601, 16, 200
    q, k, v = random_qkv(2, 8, 2, lq, lk, seed=5)
    pad = torch.ones(2, lk, dtype=torch.bool)
    pad[1, :n_pad] = False  # key blocks 0-11 of sequence 1 are padding only (block 12 holds 8 real keys)
    sel = HiP(block=bs, mask_k=64, sliding_window=16, sink=4)
    pattern = sel.select(q, k, key_padding_mask=pad)
    check_rows(pattern)
    assert pattern.batch == 2 and pattern.heads == 2
    blocks = pattern.to_block_mask()
    last = last_visible_block(lq, lk, bs, bs)
    rows = last - 1 > n_pad // bs  # the window is past the padding
    assert int(rows.sum()) > 5
    assert not bool(blocks[1][:, rows, 1:n_pad // bs].any())  # block 0 is the forced sink
    unmasked = sel.select(q, k)
    assert bool(unmasked.to_block_mask()[1][:, rows, 1:n_pad // bs].any())  # so the check can fail
    assert torch.equal(blocks[0], unmasked.to_block_mask()[0])  # the unpadded sequence keeps its pattern
    assert torch.equal(sel.select(q, k, key_padding_mask=torch.ones_like(pad)).to_block_mask(),
                       unmasked.to_block_mask())
    out = block_sparse_attention(q, k, v, pattern, key_padding_mask=pad, backend="reference")
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, :, n_pad - (lk - lq):]).all()


def test_padded_queries_do_not_score():
    """Changing padded (sampled) queries changes nothing."""
    lq = lk = 400
    q, k, _ = random_qkv(2, 4, 2, lq, lk, seed=8)
    pad = torch.ones(2, lk, dtype=torch.bool)
    pad[1, :120] = False
    sel = HiP(block=16, mask_k=32, sliding_window=0, sink=4)
    want = sel.select(q, k, key_padding_mask=pad).to_block_mask()
    q2 = q.clone()
    q2[1, :, :120] = 100 * torch.randn(4, 120, 32)
    assert torch.equal(sel.select(q2, k, key_padding_mask=pad).to_block_mask(), want)


def test_centre_is_the_previous_behaviour():
    """``scoring="centre"`` is the paper's centre token, unchanged: the pattern committed before the bound existed
    (recorded from commit 48fa4a7's HiP) on one geometry with padding and GQA."""
    q, k, _ = random_qkv(2, 4, 2, 237, 700, dim=16, seed=1)
    pad = torch.ones(2, 700, dtype=torch.bool)
    pad[1, :233] = False
    # last_window=False: the pin predates it (700 keys is not a multiple of 16: it would add a last-row block)
    pattern = HiP(block=16, mask_k=48, sliding_window=20, sink=4, query_samples=6,
                  scoring="centre", last_window=False).select(q, k, key_padding_mask=pad)
    blocks = pattern.to_block_mask()
    assert int(blocks.sum()) == CENTRE_SUM and hash_of(blocks) == CENTRE_HASH


CENTRE_SUM, CENTRE_HASH = 420, 554883


def hash_of(blocks):
    weights = torch.arange(1, blocks.numel() + 1, dtype=torch.float64).view(blocks.shape)
    return int((blocks.double() * weights).sum())


@pytest.mark.parametrize("value", ["max", "", None, "Bound"])
def test_bad_scoring(value):
    with pytest.raises(ValueError, match=r"scoring must be one of \('bound', 'centre'\)"):
        HiP(scoring=value)
