"""LongHeads with Quest-bound chunk scoring (``scoring="bound"``): exact at a full budget, chunk scores equal a
brute-force max over pieces of their bounds, a needle's chunk is found, padding is ignored, memory stays bounded."""

import math

import pytest
import torch

from dense_reference import dense_attention, token_mask_of
from selector_checks import assert_padding_ignored, check_rows, dense_causal, random_qkv
from sparsa.ops import block_sparse_attention
from sparsa.prefill import longheads
from sparsa.prefill.estimate import sample_rows
from sparsa.prefill.longheads import LongHeads

# Small-scale LongHeads: 64-token chunks of four 16-token blocks, 4 chunks per query.
SMALL = dict(block=16, window_size=64, atten_length=256, begin_selective_length=256, scoring="bound")
GEOMETRIES = [(333, 333), (300, 700), (77, 1000)]


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("lq,lk", GEOMETRIES)
def test_full_budget_is_dense_causal(group, lq, lk):
    q, k, v = random_qkv(2, 2 * group, 2, lq, lk, seed=group)
    pattern = LongHeads(**dict(SMALL, atten_length=1024)).select(q, k)
    check_rows(pattern)
    assert pattern.density() == 1.0
    out = block_sparse_attention(q, k, v, pattern, backend="reference")
    assert (out.double() - dense_causal(q, k, v)).abs().max() <= 1e-5


@pytest.mark.parametrize("group", [1, 2])
def test_small_budget_is_sparse_and_exact_on_its_pattern(group):
    q, k, v = random_qkv(2, 2 * group, 2, 300, 700, seed=10 + group)
    pattern = LongHeads(**SMALL).select(q, k)
    check_rows(pattern)
    assert pattern.heads == 2 * group and pattern.batch == 2
    assert pattern.density() < 0.5
    out = block_sparse_attention(q, k, v, pattern, backend="reference")
    assert (out.double() - dense_causal(q, k, v)).abs().max() > 1e-3
    mask = token_mask_of(pattern, 2, 2 * group, 2, causal=True)
    assert (out.double() - dense_attention(q, k, v, mask)[0]).abs().max() <= 1e-5
    assert not torch.equal(pattern.to_block_mask(),
                           LongHeads(**dict(SMALL, scoring="pooled")).select(q, k).to_block_mask())


def _brute_force_scores(sel, q, k, real):
    """``[B, Hq, Qb, C]`` float64: per query head and block, max over its real sampled queries and over the
    chunk's pieces holding a real key of ``sum_d max(q_d kmax_d, q_d kmin_d)`` over the piece's real keys."""
    batch, hq, lq, _ = q.shape
    hkv, lk = k.shape[1:3]
    bs, w, group = sel.block, sel.window_size, hq // hkv
    n_chunks, per = lk // w, w // bs
    rows = sample_rows(lq, bs, sel.query_samples, "cpu")
    out = torch.full((batch, hq, len(rows), n_chunks), -math.inf, dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            for c in range(n_chunks):
                for p in range(per):
                    lo = c * w + p * bs
                    keys = k[b, h // group, lo:lo + bs].double()[real[b, lo:lo + bs]]
                    if len(keys) == 0:
                        continue
                    kmax, kmin = keys.amax(0), keys.amin(0)
                    for r, row in enumerate(rows):
                        for i in row.tolist():
                            if not real[b, i + lk - lq]:
                                continue
                            qi = q[b, h, i].double()
                            bound = torch.maximum(qi * kmax, qi * kmin).sum()
                            out[b, h, r, c] = max(out[b, h, r, c], bound)
    return out


@pytest.mark.parametrize("padded", [False, True])
def test_chunk_scores_match_brute_force(padded):
    """GQA (4 query heads on 2 KV heads), queries after a key prefix, a key length that is not a multiple of the
    chunk (its tail is never a candidate); with padding: random holes and a left-padded second sequence."""
    lq, lk = 100, 300  # 4 whole chunks of 64, a 44-token tail
    q, k, _ = random_qkv(2, 4, 2, lq, lk, dim=8, seed=31)
    real = torch.ones(2, lk, dtype=torch.bool)
    if padded:
        g = torch.Generator().manual_seed(32)
        real = torch.rand(2, lk, generator=g) < 0.7
        real[1, :90] = False  # chunk 0 and the first piece of chunk 1 of sequence 1: padding only
        real[0, 200:216] = False  # one whole piece of chunk 3 of sequence 0
    sel = LongHeads(**dict(SMALL, query_samples=5))
    got = sel._chunk_scores(q, k, lk // sel.window_size, real if padded else None)
    want = _brute_force_scores(sel, q, k, real)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    if padded:
        assert bool(torch.isinf(got[1, :, :, 0]).all())  # a chunk of padding only
    fin = torch.isfinite(want)
    assert int(fin.sum()) > 0.8 * fin.numel()
    assert torch.allclose(got[fin].double(), want[fin], rtol=1e-5, atol=1e-5)


def test_finds_the_needle_chunk():
    """Keys of small variance; one key ``+3 u`` inside a far chunk, and a chunk whose every key is ``+0.5 u``; the
    last query block aligned with ``u``. With one free chunk the bound keeps the needle's chunk, while the pooled
    chunk key (which pools the needle out) keeps the chunk of mild matches."""
    lq = lk = 1024
    bs, w, dim, needle_chunk, mild_chunk = 16, 64, 32, 5, 9
    g = torch.Generator().manual_seed(5)
    u = torch.randn(dim, generator=g)
    u = u / u.norm()
    q = torch.randn(1, 2, lq, dim, generator=g)
    k = 0.1 * torch.randn(1, 1, lk, dim, generator=g)
    q[:, :, -bs:] = 0.1 * torch.randn(2, bs, dim, generator=g) + 2 * u
    k[0, 0, needle_chunk * w + 37] += 3 * u  # inside the chunk's third piece
    k[0, 0, mild_chunk * w:(mild_chunk + 1) * w] += 0.5 * u
    r, cur = lq // bs - 1, lk // w - 1
    kept = {}
    for scoring in ("bound", "pooled"):
        pattern = LongHeads(**dict(SMALL, scoring=scoring)).select(q, k)
        check_rows(pattern)
        row = pattern.to_block_mask()[0, :, r, : cur * (w // bs)].view(2, cur, w // bs).all(-1)
        kept[scoring] = [set(row[h].nonzero().flatten().tolist()) for h in range(2)]
    assert kept["bound"] == [{0, needle_chunk, cur - 1}] * 2
    assert kept["pooled"] == [{0, mild_chunk, cur - 1}] * 2  # so the needle test can tell the two apart


@pytest.mark.parametrize("lq", [640, 500])
def test_ignores_padded_keys(lq):
    """Batch 2, the second left-padded: real query blocks never pick chunks of padding only (chunk 0 stays
    forced), while the unmasked scores do; the unpadded sequence and an all-True mask keep the unmasked pattern."""
    lk, bs, w, n_pad = 640, 16, 64, 200  # chunks 0-2 of sequence 1 are padding, chunk 3 partly
    q, k, v = random_qkv(2, 4, 2, lq, lk, seed=22)
    pad = torch.ones(2, lk, dtype=torch.bool)
    pad[1, :n_pad] = False
    sel = LongHeads(**dict(SMALL, atten_length=384, begin_selective_length=64))
    pattern = assert_padding_ignored(sel, q, k, v, pad, _rows_past(lq, lk, bs, 4 * w), slice(w // bs, 3 * w // bs),
                                     n_pad)
    check_rows(pattern)
    assert pattern.batch == 2 and pattern.heads == 4


def _rows_past(lq, lk, bs, pos):
    rows = torch.arange(-(-lq // bs)) * bs + (lk - lq) >= pos
    assert int(rows.sum()) > 10
    return rows


def test_padded_queries_do_not_score():
    lq = lk = 640
    q, k, _ = random_qkv(2, 4, 2, lq, lk, seed=8)
    pad = torch.ones(2, lk, dtype=torch.bool)
    pad[1, :200] = False
    sel = LongHeads(**dict(SMALL, begin_selective_length=64))
    before = sel.select(q, k, key_padding_mask=pad).to_block_mask()
    q2 = q.clone()
    q2[1, :, :200] = 100 * torch.randn(4, 200, 32)
    assert torch.equal(sel.select(q2, k, key_padding_mask=pad).to_block_mask(), before)


def test_slices_give_the_same_scores(monkeypatch):
    q, k, _ = random_qkv(2, 4, 2, 700, 900, seed=7)
    pad = torch.ones(2, 900, dtype=torch.bool)
    pad[1, :300] = False
    sel = LongHeads(**dict(SMALL, query_samples=5))
    whole = sel._chunk_scores(q, k, 900 // 64, pad)
    monkeypatch.setattr(longheads, "_BOUND_SLICE_ELEMENTS", 3 * 2 * 4 * 5 * (900 // 64) * 4)  # 3 query blocks
    sliced = sel._chunk_scores(q, k, 900 // 64, pad)
    assert torch.equal(sliced, whole)


def test_memory_bounded_at_128k():
    """At 128K tokens (B=1, 32/8 heads, D=128, bf16; meta tensors: no host sync can happen) no intermediate of the
    estimation exceeds 256 MiB (float32 on a non-CUDA device: 2^26 elements)."""
    from test_hip_longheads_overhead import _ops_per_call

    for padded in (False, True):
        ops = _ops_per_call(LongHeads(scoring="bound"), 131072, padded)
        assert ops.largest <= 256 << 20, ops.largest


def test_default_and_bad_scoring():
    assert LongHeads().scoring == "bound"
    q, k, _ = random_qkv(1, 4, 2, 640, 640, seed=9)
    params = dict(SMALL, begin_selective_length=64)
    a = LongHeads(**dict(params, scoring="bound")).select(q, k)
    b = LongHeads(**{n: v for n, v in params.items() if n != "scoring"}).select(q, k)
    assert torch.equal(a.kv_indices, b.kv_indices) and torch.equal(a.kv_num_blocks, b.kv_num_blocks)
    with pytest.raises(ValueError, match="scoring.*pooled.*bound"):
        LongHeads(scoring="mean")
