"""LongHeads prefill selector: exact at a full budget, per-head chunk choice, planted chunks are found."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsa
import sparsa.prefill.longheads  # noqa: F401  (registers "longheads" until the package imports it)
from selector_checks import assert_padding_ignored, check_rows as _check_rows, dense_causal as _dense_causal, \
    random_qkv as _qkv
from dense_reference import dense_attention, token_mask_of
from sparsa.ops import block_sparse_attention
from sparsa.prefill.longheads import LongHeads

# Small-scale LongHeads: 64-token chunks of four 16-token blocks, 4 chunks per query.
SMALL = dict(block=16, window_size=64, atten_length=256, begin_selective_length=256)


GEOMETRIES = [(333, 333), (300, 700), (77, 1000)]


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("lq,lk", GEOMETRIES)
@pytest.mark.parametrize("full", ["atten_length", "begin_selective_length"])
def test_full_budget_is_dense_causal(group, lq, lk, full):
    q, k, v = _qkv(2, 2 * group, 2, lq, lk, seed=group)
    params = dict(SMALL, **{full: 1024})
    pattern = LongHeads(**params).select(q, k)
    _check_rows(pattern)
    assert pattern.density() == 1.0
    out = block_sparse_attention(q, k, v, pattern, backend="reference")
    assert (out.double() - _dense_causal(q, k, v)).abs().max() <= 1e-5


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("lq,lk", GEOMETRIES[1:])
def test_small_budget_is_sparse_and_exact_on_its_pattern(group, lq, lk):
    q, k, v = _qkv(2, 2 * group, 2, lq, lk, seed=10 + group)
    pattern = LongHeads(**SMALL).select(q, k)
    _check_rows(pattern)
    assert pattern.heads == 2 * group and pattern.batch == 2  # one pattern per query head and sequence
    assert pattern.density() < 0.5
    out = block_sparse_attention(q, k, v, pattern, backend="reference")
    assert (out.double() - _dense_causal(q, k, v)).abs().max() > 1e-3
    mask = token_mask_of(pattern, 2, 2 * group, 2, causal=True)
    assert (out.double() - dense_attention(q, k, v, mask)[0]).abs().max() <= 1e-5


def test_chunk_structure():
    """Past begin_selective_length a query block sees atten_length/w whole chunks: the first, the previous,
    its own (up to the diagonal) and the best others; before it, everything."""
    lq = lk = 1024
    q, k, _ = _qkv(2, 4, 2, lq, lk, seed=3)
    pattern = LongHeads(**SMALL).select(q, k)
    blocks = pattern.to_block_mask()  # [2, 4, 64, 64]
    for r in (20, 41, 63):
        row = blocks[:, :, r]
        chunks = row.view(2, 4, 16, 4)  # 16 chunks of 4 blocks
        cur = r // 4
        assert row[..., : (r // 4) * 4].view(2, 4, cur, 4).all(-1).sum(-1).eq(3).all()  # 3 whole past chunks
        assert chunks[..., 0, :].all() and chunks[..., cur - 1, :].all()  # first and previous chunk
        assert row[..., cur * 4: r + 1].all() and not row[..., r + 1:].any()  # current chunk up to the diagonal
    assert blocks[:, :, :16].sum(-1).eq(torch.arange(1, 17)).all()  # first 256 tokens: dense causal


def test_density_decreases_with_budget():
    q, k, _ = _qkv(2, 4, 2, 1024, 1024, seed=4)
    densities = [LongHeads(**dict(SMALL, atten_length=a)).select(q, k).density() for a in (768, 512, 256, 192)]
    assert all(a > b for a, b in zip(densities, densities[1:])), densities
    assert densities[-1] < 0.4


@pytest.mark.parametrize("lq", [1024, 400])
def test_finds_planted_chunks_per_query_head(lq):
    """Two query heads of one KV group look for different directions, each planted in one far key block:
    each head keeps its own chunk (per-query-head patterns) with a budget of one free chunk."""
    lk, bs, w, dim = 1024, 16, 64, 32
    g = torch.Generator().manual_seed(5)
    u = torch.randn(2, dim, generator=g)
    u = u / u.norm(dim=-1, keepdim=True) * math.sqrt(dim)
    q = torch.randn(1, 2, lq, dim, generator=g)
    k = torch.randn(1, 1, lk, dim, generator=g)
    r = (lq - 1) // bs - 1  # a query block near the end
    planted = (5, 9)  # chunks; one block of each gets the direction
    for h, c in enumerate(planted):
        q[0, h, r * bs:(r + 1) * bs] += 2 * u[h]
        start = c * w + bs  # the second block of chunk c
        k[0, 0, start:start + bs] = 3 * u[h] + 0.3 * torch.randn(bs, dim, generator=g)
    pattern = LongHeads(**SMALL).select(q, k)
    _check_rows(pattern)
    cur = ((lk - lq) + r * bs) // w
    for h, c in enumerate(planted):
        chunks = pattern.to_block_mask()[0, h, r, : cur * (w // bs)].view(cur, w // bs).all(-1)
        assert set(chunks.nonzero().flatten().tolist()) == {0, c, cur - 1}, (h, chunks)


@settings(max_examples=15)
@given(lq=st.integers(1, 400), extra=st.integers(0, 400), block=st.sampled_from([16, 32]),
       chunks=st.integers(1, 4), slots=st.integers(1, 6), begin=st.integers(0, 500),
       samples=st.integers(1, 16), group=st.sampled_from([1, 2]))
def test_any_geometry_gives_a_valid_pattern(lq, extra, block, chunks, slots, begin, samples, group):
    q, k, _ = _qkv(1, 2 * group, 2, lq, lq + extra, dim=8, seed=lq)
    sel = LongHeads(block=block, window_size=chunks * block, atten_length=slots * chunks * block,
                    begin_selective_length=begin, query_samples=samples)
    _check_rows(sel.select(q, k))


@pytest.mark.parametrize("params,field", [
    (dict(window_size=0), "window_size"),
    (dict(window_size=200), "window_size"),
    (dict(atten_length=0), "atten_length"),
    (dict(atten_length=1000), "atten_length"),
    (dict(begin_selective_length=-1), "begin_selective_length"),
    (dict(block=100), "block"),
    (dict(query_samples=0), "query_samples"),
    (dict(block=64, query_samples=65), "query_samples"),
    (dict(dense_below=-1), "dense_below"),
])
def test_bad_parameters(params, field):
    with pytest.raises(ValueError, match=field):
        LongHeads(**params)


def test_bad_head_counts():
    q, k, _ = _qkv(1, 3, 2, 64, 64)
    with pytest.raises(ValueError, match="multiple"):
        LongHeads(**SMALL).select(q, k)


@pytest.mark.parametrize("lq", [640, 500])
def test_ignores_padded_keys(lq):
    """A left-padded second sequence: real query blocks never pick chunks made only of padding by score (chunk 0
    stays forced), while the unmasked scores do; an unpadded sequence keeps its pattern."""
    lk, bs, w, n_pad = 640, 16, 64, 200  # chunks 0-2 of sequence 1 are padding, chunk 3 partly
    q, k, v = _qkv(2, 4, 2, lq, lk, seed=22)
    pad = torch.ones(2, lk, dtype=torch.bool)
    pad[1, :n_pad] = False
    sel = LongHeads(**dict(SMALL, atten_length=384, begin_selective_length=64))
    pattern = sel.select(q, k, key_padding_mask=pad)
    _check_rows(pattern)
    assert pattern.batch == 2 and pattern.heads == 4
    first_pos = torch.arange(-(-lq // bs)) * bs + (lk - lq)
    rows = first_pos >= 4 * w  # the previous chunk (forced) is past the padding
    assert int(rows.sum()) > 10
    padded_only = slice(w // bs, (n_pad // w) * (w // bs))  # blocks of chunks 1-2 (chunk 0 is forced)
    assert_padding_ignored(sel, q, k, v, pad, rows, padded_only, n_pad)


# -------------------------------------------------------------------------------------- Hugging Face path
def test_through_hugging_face_with_left_padding():
    from test_hf import _inputs, _pair

    ref, ours = _pair("llama", seed=0)
    ids, mask = _inputs(length=150, pad=37, seed=1)
    small = dict(block=16, window_size=32, atten_length=64, begin_selective_length=64)
    sparsa.configure(ours, prefill="longheads", dense_below=0, **small)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
    stats = sparsa.stats(ours)
    assert stats["methods"] == ["longheads"]
    assert stats["density"] < 1.0 and not stats["fallbacks"]
    # at a full budget the model reproduces sdpa on the real tokens
    sparsa.configure(ours, prefill="longheads", dense_below=0, **dict(small, atten_length=4096))
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        want = ref(ids, attention_mask=mask).logits
    assert (full - want)[mask.bool()].abs().max() <= 1e-5
