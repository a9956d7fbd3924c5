"""block_sparse_attention against the independent dense reference (tests/dense_reference.py) and torch SDPA."""

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dense_reference import block_map_for_heads, dense_attention, token_mask_of
from sparsa import BlockPattern, Neighborhood1D, SinkWindow
from sparsa.ops import attention, block_sparse_attention, merge_attention, naive
from sparsa.ops.flex import build_block_mask, flex_available
from sparsa.pattern import causal_block_mask

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
LSE_TOL = {torch.float32: 1e-5, torch.float64: 1e-6,  # lse is float32 for every input dtype
           torch.bfloat16: 1e-4, torch.float16: 1e-4}


def cdiv(a, b):
    return -(-a // b)


def make_qkv(batch, hq, hkv, lq, lk, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, lq, dim, generator=g).to(dtype)
    k = torch.randn(batch, hkv, lk, dim, generator=g).to(dtype)
    v = torch.randn(batch, hkv, lk, dim, generator=g).to(dtype)
    return q, k, v


def left_padding(batch, lk, pads):
    """[B, Lk] bool, False for the first pads[b] keys of sequence b."""
    mask = torch.ones(batch, lk, dtype=torch.bool)
    for b, n in enumerate(pads):
        mask[b, :n] = False
    return mask


def random_pattern(shape, lq, lk, block_q, block_k, density, seed, token_mask=None):
    qb, kb = cdiv(lq, block_q), cdiv(lk, block_k)
    g = torch.Generator().manual_seed(seed + 1000)
    mask = torch.rand(*shape, qb, kb, generator=g) < density
    return BlockPattern.from_block_mask(mask, q_len=lq, kv_len=lk, block_q=block_q, block_k=block_k,
                                       token_mask=token_mask)


def reference(q, k, v, pattern, causal=True, key_padding_mask=None, scale=None):
    mask = token_mask_of(pattern, q.shape[0], q.shape[1], k.shape[1], causal, key_padding_mask)
    return dense_attention(q, k, v, mask, scale)


def assert_matches(out, lse, ref_out, ref_lse, dtype):
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), ref_out, **TOL[dtype])
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse is -inf exactly on rows that see no key"
    assert (out[empty] == 0).all(), "rows that see no key give 0"
    tol = LSE_TOL[dtype]
    torch.testing.assert_close(lse.double()[~empty], ref_lse[~empty], atol=tol, rtol=tol)


# (batch, Hq, Hkv, Lq, Lk, D, block_q, block_k, pattern (batch, heads), causal, left pads per sequence, density)
CASES = [
    (1, 1, 1, 37, 37, 32, 16, 16, (1, 1), True, None, 0.6),
    (2, 4, 2, 45, 77, 64, 16, 8, (2, "kv"), True, [0, 50], 0.5),
    (3, 8, 8, 50, 50, 128, 8, 16, (1, "q"), True, [3, 0, 20], 0.4),
    (2, 8, 1, 29, 100, 32, 16, 16, (2, 1), True, [80, 7], 0.7),
    (1, 16, 4, 63, 63, 64, 32, 32, (1, "kv"), False, None, 0.5),
    (3, 8, 4, 1, 41, 32, 8, 8, (3, "q"), True, [0, 41, 40], 0.8),
    (2, 6, 2, 33, 70, 128, 12, 5, (1, "kv"), False, [10, 69], 0.3),
    (1, 16, 8, 40, 57, 32, 7, 9, (1, "q"), True, [30], 0.5),
    (2, 2, 2, 100, 100, 64, 16, 16, (2, "q"), True, [99, 1], 1.0),
    (1, 4, 4, 19, 23, 32, 64, 64, (1, 1), False, None, 1.0),  # one block larger than the sequence
]


def _pattern_for(case, seed):
    batch, hq, hkv, lq, lk, dim, bq, bk, (pb, ph), causal, pads, density = case
    heads = {"q": hq, "kv": hkv}.get(ph, ph)
    return random_pattern((pb, heads), lq, lk, bq, bk, density, seed)


@pytest.mark.parametrize("tiny_chunks", [False, True])
@pytest.mark.parametrize("index", range(len(CASES)))
def test_random_patterns_fp32(index, tiny_chunks, poisoned_outputs, monkeypatch):
    """Fresh random inputs and patterns; output buffers start as NaN so an unwritten row cannot pass."""
    case = CASES[index]
    batch, hq, hkv, lq, lk, dim, bq, bk, _, causal, pads, _ = case
    if tiny_chunks:  # many head and row steps: every chunk boundary must be written
        monkeypatch.setattr(naive, "_CHUNK_ELEMENTS", 3000)
    q, k, v = make_qkv(batch, hq, hkv, lq, lk, dim, seed=index)
    pattern = _pattern_for(case, index)
    pad = None if pads is None else left_padding(batch, lk, pads)
    out, lse = block_sparse_attention(q, k, v, pattern, causal=causal, key_padding_mask=pad, return_lse=True)
    assert poisoned_outputs.allocations >= 2
    ref_out, ref_lse = reference(q, k, v, pattern, causal, pad)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)
    out_only = block_sparse_attention(q, k, v, pattern, causal=causal, key_padding_mask=pad)
    assert torch.equal(out_only, out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("index", [1, 3, 6, 7])
def test_random_patterns_low_and_high_precision(index, dtype, poisoned_outputs):
    case = CASES[index]
    batch, hq, hkv, lq, lk, dim, bq, bk, _, causal, pads, _ = case
    q, k, v = make_qkv(batch, hq, hkv, lq, lk, dim, dtype, seed=100 + index)
    pattern = _pattern_for(case, 100 + index)
    pad = None if pads is None else left_padding(batch, lk, pads)
    out, lse = block_sparse_attention(q, k, v, pattern, causal=causal, key_padding_mask=pad, return_lse=True)
    assert_matches(out, lse, *reference(q, k, v, pattern, causal, pad), dtype)


def test_rows_that_see_no_key(poisoned_outputs):
    """Left padding longer than the prefix: the first queries see nothing (causal). Output 0, lse -inf."""
    q, k, v = make_qkv(2, 4, 2, 20, 30, 32, seed=5)
    pad = left_padding(2, 30, [15, 30])  # sequence 1 is all padding
    out, lse = block_sparse_attention(q, k, v, causal=True, key_padding_mask=pad, return_lse=True)
    # sequence 0: queries at positions 10..14 only see padded keys
    assert torch.isneginf(lse[0, :, :5]).all() and (out[0, :, :5] == 0).all()
    assert torch.isfinite(lse[0, :, 5:]).all()
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()
    assert_matches(out, lse, *reference(q, k, v, BlockPattern.dense(20, 30), True, pad), torch.float32)
    # a pattern row with no key block at all
    p = BlockPattern.from_block_mask(torch.tensor([[False, False], [True, True]]), q_len=20, kv_len=30, block_q=16)
    out, lse = block_sparse_attention(q, k, v, p, return_lse=True)
    assert torch.isneginf(lse[:, :, :16]).all() and (out[:, :, :16] == 0).all()
    assert torch.isfinite(lse[:, :, 16:]).all()


# --------------------------------------------------------------------------------- dense == torch SDPA
@pytest.mark.parametrize("batch,hq,hkv,lq,lk,dim,block", [(1, 2, 2, 70, 70, 32, 16), (2, 8, 2, 45, 130, 64, 32),
                                                          (3, 4, 1, 1, 77, 128, 16), (1, 8, 4, 100, 100, 64, 128)])
@pytest.mark.parametrize("causal", [True, False])
def test_dense_pattern_equals_sdpa(batch, hq, hkv, lq, lk, dim, block, causal):
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = make_qkv(batch, hq, hkv, lq, lk, dim, seed=lq + lk)
    pattern = BlockPattern.dense(lq, lk, causal=causal, block_q=block)
    out = block_sparse_attention(q, k, v, pattern, causal=causal)
    kk, vv = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    if causal:  # queries aligned bottom-right: the last query sees every key
        want = F.scaled_dot_product_attention(q, kk, vv, attn_mask=causal_lower_right(lq, lk))
    else:
        want = F.scaled_dot_product_attention(q, kk, vv)
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    # pattern=None is the dense pattern
    torch.testing.assert_close(block_sparse_attention(q, k, v, causal=causal), want, **TOL[torch.float32])


def test_small_budget_differs_from_dense():
    lq = lk = 300
    q, k, v = make_qkv(2, 4, 2, lq, lk, 64, seed=11)
    scores = torch.rand(1, 4, cdiv(lq, 32), cdiv(lk, 32), generator=torch.Generator().manual_seed(3))
    sparse = BlockPattern.from_block_scores(scores, q_len=lq, kv_len=lk, block_q=32, topk=1)
    assert sparse.density() < 0.5
    out, lse = block_sparse_attention(q, k, v, sparse, return_lse=True)
    dense_out, dense_lse = block_sparse_attention(q, k, v, return_lse=True)
    assert (out - dense_out).abs().max() > 0.1
    assert (lse <= dense_lse + 1e-5).all() and (lse < dense_lse - 1e-3).any()  # fewer keys: smaller sum
    assert_matches(out, lse, *reference(q, k, v, sparse), torch.float32)


# ----------------------------------------------------------------------------------------------- lse
@pytest.mark.parametrize("scale", [None, 0.05, 1.0])
def test_lse_is_natural_log_of_the_softmax_denominator(scale):
    q, k, v = make_qkv(2, 4, 2, 33, 50, 32, seed=21)
    pattern = random_pattern((2, 4), 33, 50, 8, 8, 0.6, seed=4)
    pad = left_padding(2, 50, [0, 40])  # sequence 1: queries at positions 17..39 see no key
    out, lse = block_sparse_attention(q, k, v, pattern, scale=scale, key_padding_mask=pad, return_lse=True)
    s = scale if scale is not None else 1 / math.sqrt(32)
    mask = token_mask_of(pattern, 2, 4, 2, True, pad)
    scores = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * s
    want = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)
    empty = torch.isneginf(want)
    assert empty.any() and not empty.all()
    assert torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse.double()[~empty], want[~empty], atol=1e-5, rtol=1e-5)
    # and it is the normaliser of the output's weights
    w = torch.exp(scores.masked_fill(~mask, float("-inf")) - lse.double()[..., None])
    torch.testing.assert_close(w.sum(-1)[~empty], torch.ones_like(want[~empty]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.double(), w.nan_to_num() @ v.double().repeat_interleave(2, 1), atol=1e-5,
                               rtol=1e-5)


def test_merge_attention_of_disjoint_halves_is_the_whole():
    q, k, v = make_qkv(2, 4, 2, 40, 64, 32, seed=31)
    whole = random_pattern((1, 4), 40, 64, 8, 8, 0.7, seed=6).to_block_mask()
    split = torch.rand(whole.shape, generator=torch.Generator().manual_seed(7)) < 0.5
    a = BlockPattern.from_block_mask(whole & split, q_len=40, kv_len=64, block_q=8)
    b = BlockPattern.from_block_mask(whole & ~split, q_len=40, kv_len=64, block_q=8)
    full = BlockPattern.from_block_mask(whole, q_len=40, kv_len=64, block_q=8)
    pad = left_padding(2, 64, [0, 30])
    out_a, lse_a = block_sparse_attention(q, k, v, a, key_padding_mask=pad, return_lse=True)
    out_b, lse_b = block_sparse_attention(q, k, v, b, key_padding_mask=pad, return_lse=True)
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    assert torch.isneginf(lse_a).any() and torch.isneginf(lse_b).any()
    assert_matches(out, lse, *reference(q, k, v, full, True, pad), torch.float32)


# -------------------------------------------------------------------------------------- token masks
@pytest.mark.parametrize("pattern_fn,causal", [
    (lambda: BlockPattern.streaming(61, 90, sink=4, window=20, block_q=16), True),
    (lambda: BlockPattern.sliding_window(70, window=9, dilation=2, causal=False, block_q=8, block_k=16), False),
    (lambda: BlockPattern.sliding_window(33, 70, window=5, dilation=3, block_q=8), True),
    (lambda: BlockPattern.neighborhood_2d(7, 9, kernel_size=(3, 5), dilation=(2, 1), block_q=16, block_k=8), False),
    (lambda: BlockPattern.from_block_mask(causal_block_mask(50, 50, 8, 8), q_len=50, kv_len=50, block_q=8,
                                          token_mask=SinkWindow(2, 7)), True),
])
def test_token_mask_patterns(pattern_fn, causal, poisoned_outputs):
    pattern = pattern_fn()
    q, k, v = make_qkv(2, 4, 2, pattern.q_len, pattern.kv_len, 32, seed=pattern.q_len)
    pad = left_padding(2, pattern.kv_len, [0, 5])
    out, lse = block_sparse_attention(q, k, v, pattern, causal=causal, key_padding_mask=pad, return_lse=True)
    assert_matches(out, lse, *reference(q, k, v, pattern, causal, pad), torch.float32)


def test_streaming_equals_dense_attention_with_the_token_rule():
    """Exact per token: the same as dense attention under the written-out sink + window mask."""
    lq, lk, sink, window = 40, 75, 3, 11
    q, k, v = make_qkv(1, 2, 1, lq, lk, 64, seed=8)
    out, lse = block_sparse_attention(q, k, v, BlockPattern.streaming(lq, lk, sink=sink, window=window, block_q=16),
                                      return_lse=True)
    pos = torch.arange(lq)[:, None] + lk - lq
    key = torch.arange(lk)[None]
    rule = (key <= pos) & ((key < sink) | (pos - key < window))
    assert_matches(out, lse, *dense_attention(q, k, v, rule.expand(1, 2, lq, lk)), torch.float32)


def test_unused_index_entries_are_ignored():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, seed=9)
    num = torch.tensor([[[1, 2, 3]]], dtype=torch.int32)
    clean = torch.tensor([[[[0, 0, 0], [0, 1, 0], [0, 1, 2]]]], dtype=torch.int32)
    dirty = torch.tensor([[[[0, -10**6, 7], [0, 1, 10**6], [0, 1, 2]]]], dtype=torch.int32)
    want = block_sparse_attention(q, k, v, BlockPattern(num, clean, 16, 16, 40, 40))
    got = block_sparse_attention(q, k, v, BlockPattern(num, dirty, 16, 16, 40, 40))
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------- property tests
@settings(max_examples=80)
@given(st.data())
def test_property_random_shapes(data):
    batch = data.draw(st.integers(1, 3), label="batch")
    hkv = data.draw(st.sampled_from([1, 2, 4]), label="hkv")
    hq = hkv * data.draw(st.sampled_from([1, 2, 3]), label="group")
    dim = data.draw(st.sampled_from([8, 16, 32]), label="dim")
    lk = data.draw(st.integers(1, 70), label="lk")
    lq = data.draw(st.integers(1, lk), label="lq")
    bq = data.draw(st.integers(1, 24), label="block_q")
    bk = data.draw(st.integers(1, 24), label="block_k")
    pb = data.draw(st.sampled_from([1, batch]), label="pattern batch")
    ph = data.draw(st.sampled_from([1, hkv, hq]), label="pattern heads")
    density = data.draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]), label="density")
    causal = data.draw(st.booleans(), label="causal")
    padded = data.draw(st.booleans(), label="padded")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    q, k, v = make_qkv(batch, hq, hkv, lq, lk, dim, seed=seed)
    pattern = random_pattern((pb, ph), lq, lk, bq, bk, density, seed)
    pad = None
    if padded:
        pads = torch.randint(0, lk + 1, (batch,), generator=torch.Generator().manual_seed(seed)).tolist()
        pad = left_padding(batch, lk, pads)
    out, lse = block_sparse_attention(q, k, v, pattern, causal=causal, key_padding_mask=pad, return_lse=True)
    assert_matches(out, lse, *reference(q, k, v, pattern, causal, pad), torch.float32)


# ------------------------------------------------------------------------------------------ bad input
def _bad_inputs():
    q, k, v = make_qkv(2, 4, 2, 20, 30, 16)
    p = BlockPattern.dense(20, 30, block_q=8)

    def raw(num, idx, lq=20, lk=30):
        return BlockPattern(torch.tensor(num, dtype=torch.int32), torch.tensor(idx, dtype=torch.int32), 8, 8, lq, lk)

    call = block_sparse_attention
    return [
        ("q must be 4-D", lambda: call(q[0], k, v)),
        ("k .* and v .* must agree", lambda: call(q, k, v[:, :, :29])),
        ("k .* and v .* must agree", lambda: call(q, k, v[:, :1])),
        ("same batch size", lambda: call(q[:1], k, v)),
        ("same head dim", lambda: call(q[..., :8], k, v)),
        ("query heads \\(3\\) must be a multiple", lambda: call(q[:, :3], k, v)),
        ("q has more positions", lambda: call(q, k[:, :, :19], v[:, :, :19])),
        ("q must be float", lambda: call(q.long(), k, v)),
        ("k must be float", lambda: call(q, k.int(), v)),
        ("v must be float", lambda: call(q, k, v.bool())),
        ("must share a dtype", lambda: call(q, k.double(), v.double())),
        ("must share a dtype", lambda: call(q.half(), k, v)),
        ("q must be a tensor", lambda: call(q.tolist(), k, v)),
        ("pattern was built for q_len=20, kv_len=30", lambda: call(q[:, :, :19], k, v, p)),
        ("pattern was built for", lambda: call(q[:, :, :10], k[:, :, :10], v[:, :, :10], p)),
        ("pattern batch", lambda: call(q, k, v, p.expand(3, 1))),
        ("pattern head dim", lambda: call(q, k, v, p.expand(1, 3))),
        ("pattern must be a sparsa.BlockPattern", lambda: call(q, k, v, torch.ones(3, 4, dtype=torch.bool))),
        ("kv_indices out of range", lambda: call(q, k, v, raw([[[1, 1, 1]]], [[[[0], [4], [1]]]]))),
        ("kv_indices out of range", lambda: call(q, k, v, raw([[[1, 1, 1]]], [[[[0], [-1], [1]]]]))),
        ("strictly increasing", lambda: call(q, k, v, raw([[[2, 1, 1]]], [[[[1, 0], [0, 0], [1, 0]]]]))),
        ("strictly increasing", lambda: call(q, k, v, raw([[[2, 1, 1]]], [[[[1, 1], [0, 0], [1, 0]]]]))),
        ("kv_num_blocks must lie in", lambda: call(q, k, v, raw([[[2, 1, 1]]], [[[[0], [0], [1]]]]))),
        ("key_padding_mask must be a bool tensor", lambda: call(q, k, v, key_padding_mask=torch.ones(2, 30))),
        ("key_padding_mask must be a bool tensor", lambda: call(q, k, v,
                                                                 key_padding_mask=torch.ones(2, 29, dtype=torch.bool))),
        ("key_padding_mask must be a bool tensor", lambda: call(q, k, v,
                                                                 key_padding_mask=torch.ones(30, dtype=torch.bool))),
        ("key_padding_mask must be a bool tensor", lambda: call(q, k, v, key_padding_mask=[[True] * 30] * 2)),
        ("backend must be one of", lambda: call(q, k, v, backend="cuda")),
        ("scale must be a positive finite", lambda: call(q, k, v, scale=0.0)),
        ("scale must be a positive finite", lambda: call(q, k, v, scale=-1.0)),
        ("scale must be a positive finite", lambda: call(q, k, v, scale=float("nan"))),
        ("scale must be a positive finite", lambda: call(q, k, v, scale=float("inf"))),
        ("scale must be a positive finite", lambda: call(q, k, v, scale="0.1")),
    ]


@pytest.mark.parametrize("match,fn", _bad_inputs(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs_raise_value_error(match, fn):
    with pytest.raises(ValueError, match=match):
        fn()


def test_validate_false_skips_the_index_check():
    q, k, v = make_qkv(1, 1, 1, 16, 16, 8)
    p = BlockPattern(torch.tensor([[[2]]], dtype=torch.int32), torch.tensor([[[[0, 0]]]], dtype=torch.int32),
                     16, 16, 16, 16)
    with pytest.raises(ValueError, match="strictly increasing"):
        block_sparse_attention(q, k, v, p)
    block_sparse_attention(q, k, v, p, validate=False)  # the caller vouches for the pattern


# -------------------------------------------------------------------------------------------- backends
def test_auto_is_reference_on_cpu():
    q, k, v = make_qkv(2, 4, 2, 30, 45, 16, seed=2)
    p = random_pattern((1, 2), 30, 45, 8, 8, 0.5, seed=2)
    assert attention.select_backend("auto", q) == "reference"
    assert attention.select_backend("auto", q.double()) == "reference"
    assert torch.equal(block_sparse_attention(q, k, v, p), block_sparse_attention(q, k, v, p, backend="reference"))


@pytest.mark.skipif(not flex_available(), reason="no FlexAttention")
def test_flex_falls_back_to_reference_for_lse_on_cpu_and_float64(monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())
    q, k, v = make_qkv(1, 2, 1, 20, 30, 16, seed=3)
    p = random_pattern((1, 2), 20, 30, 8, 8, 0.6, seed=3)
    with pytest.warns(UserWarning, match="log-sum-exp"):
        out, lse = block_sparse_attention(q, k, v, p, backend="flex", return_lse=True)
    ref = block_sparse_attention(q, k, v, p, backend="reference", return_lse=True)
    assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1])
    with pytest.warns(UserWarning, match="float64"):
        out = block_sparse_attention(q.double(), k.double(), v.double(), p, backend="flex")
    assert_matches(out, ref[1], *reference(q.double(), k.double(), v.double(), p), torch.float64)


def _block_maps(num, idx, kb):
    out = torch.zeros(*num.shape, kb, dtype=torch.bool)
    for pos in torch.cartesian_prod(*[torch.arange(s) for s in num.shape]).view(-1, num.dim()).tolist():
        for j in range(int(num[tuple(pos)])):
            assert not out[(*pos, int(idx[(*pos, j)]))], "repeated block"
            out[(*pos, int(idx[(*pos, j)]))] = True
    return out


@pytest.mark.skipif(not flex_available(), reason="no FlexAttention")
@pytest.mark.parametrize("pattern_fn,hq,hkv,causal,pads", [
    pytest.param(lambda: BlockPattern.dense(40, 75, block_q=16), 4, 2, True, [0, 50], id="dense-gqa-prefix-pad"),
    pytest.param(lambda: random_pattern((2, 2), 33, 64, 8, 16, 0.6, seed=1), 4, 2, True, [20, 0],
                 id="random-per-kv-head-pad"),
    pytest.param(lambda: random_pattern((1, 4), 50, 50, 16, 8, 0.6, seed=2), 4, 1, False, None,
                 id="random-per-q-head-noncausal"),
    pytest.param(lambda: BlockPattern.streaming(61, 90, sink=4, window=20, block_q=8), 2, 2, True, [3, 0],
                 id="streaming-pad"),
    pytest.param(lambda: BlockPattern.sliding_window(64, window=16, causal=False, block_q=8), 2, 1, False, None,
                 id="window-noncausal"),
    pytest.param(lambda: BlockPattern.from_block_mask(causal_block_mask(48, 48, 8, 8), q_len=48, kv_len=48,
                                                      block_q=8, token_mask=SinkWindow(2, 9)), 2, 2, True, None,
                 id="token-mask-without-full-map"),
    pytest.param(lambda: BlockPattern(torch.tensor([[[1, 2, 2]]], dtype=torch.int32),
                                      torch.tensor([[[[0, 99, -5], [0, 1, 77], [1, 2, 0]]]], dtype=torch.int32),
                                      16, 16, 40, 40, token_mask=SinkWindow(1, 20)), 2, 2, True, [5, 0],
                 id="raw-token-mask-garbage-entries"),
])
def test_flex_block_mask_structure(pattern_fn, hq, hkv, causal, pads):
    """The BlockMask handed to FlexAttention, checked without compiling: its partial + full tiles are exactly
    the pattern's tiles, a "full" tile (where the mask is skipped) is fully visible, and the mask function is
    causal & padding & token mask & length."""
    pattern = pattern_fn()
    batch, lq, lk = 2, pattern.q_len, pattern.kv_len
    pad = None if pads is None else left_padding(batch, lk, pads)
    bm = build_block_mask(pattern, batch, hq, hkv, causal=causal, key_padding_mask=pad, device=torch.device("cpu"))
    kb = pattern.num_kv_blocks
    partial = _block_maps(bm.kv_num_blocks, bm.kv_indices, kb)
    full = _block_maps(bm.full_kv_num_blocks, bm.full_kv_indices, kb) if bm.full_kv_num_blocks is not None \
        else torch.zeros_like(partial)
    assert not (partial & full).any()
    tiles = (partial | full).expand(batch, hq, -1, -1)
    assert torch.equal(tiles, block_map_for_heads(pattern, batch, hq, hkv)), "BlockMask tiles != pattern tiles"

    # token level: what every (query, key) pair may see, whatever the tiles
    q_pos = torch.arange(lq)[:, None] + (lk - lq)
    k_pos = torch.arange(lk)[None, :]
    visible = torch.ones(batch, hq, lq, lk, dtype=torch.bool)
    if causal:
        visible &= k_pos <= q_pos
    if pattern.token_mask is not None:
        visible &= pattern.token_mask(q_pos, k_pos)
    if pad is not None:
        visible &= pad[:, None, None, :]
    bq, bk = pattern.block_q, pattern.block_k
    for b, h, r, c in torch.nonzero(full.expand(batch, hq, -1, -1)).tolist():
        assert (c + 1) * bk <= lk, "a full tile past the key length would skip the length check"
        assert visible[b, h, r * bq:(r + 1) * bq, c * bk:(c + 1) * bk].all(), ("full tile not fully visible",
                                                                                 b, h, r, c)
    if pattern.token_mask is None and pad is None and causal:
        assert full.any()  # tiles below the diagonal are found
    b_i = torch.arange(batch)[:, None, None, None]
    h_i = torch.arange(hq)[None, :, None, None]
    q_i = torch.arange(lq)[None, None, :, None]
    k_i = torch.arange(lk)[None, None, None, :]
    assert torch.equal(bm.mask_mod(b_i, h_i, q_i, k_i).expand(batch, hq, lq, lk), visible)


# ------------------------------------------------------------------------------ compiled flex (slow)
def _flex_vs_reference(q, k, v, pattern, causal=True, pad=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = block_sparse_attention(q, k, v, pattern, causal=causal, key_padding_mask=pad, backend="flex")
    ref_out, ref_lse = reference(q, k, v, pattern, causal, pad)
    assert out.dtype == q.dtype and not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert (out[torch.isneginf(ref_lse)] == 0).all()


needs_flex = pytest.mark.skipif(not flex_available(), reason="no FlexAttention")


@pytest.mark.slow
@needs_flex
def test_flex_dense_causal_gqa_padding_prefix():
    q, k, v = make_qkv(2, 4, 2, 40, 75, 32, seed=41)
    pad = left_padding(2, 75, [0, 50])  # sequence 1: the first 15 queries see no key
    _flex_vs_reference(q, k, v, BlockPattern.dense(40, 75, block_q=16), True, pad)


@pytest.mark.slow
@needs_flex
def test_flex_streaming_token_mask():
    q, k, v = make_qkv(1, 2, 2, 90, 90, 32, seed=42)
    _flex_vs_reference(q, k, v, BlockPattern.streaming(90, sink=4, window=20, block_q=16))


@pytest.mark.slow
@needs_flex
def test_flex_random_topk_per_head():
    lq, lk = 50, 96
    q, k, v = make_qkv(2, 4, 2, lq, lk, 32, seed=43)
    scores = torch.rand(2, 4, cdiv(lq, 16), cdiv(lk, 16), generator=torch.Generator().manual_seed(43))
    pattern = BlockPattern.from_block_scores(scores, q_len=lq, kv_len=lk, block_q=16, topk=2)
    assert pattern.density() < 0.8
    _flex_vs_reference(q, k, v, pattern)


@pytest.mark.slow
@needs_flex
def test_flex_noncausal_neighbourhood():
    pattern = BlockPattern.sliding_window(80, window=9, dilation=2, causal=False, block_q=16)
    assert isinstance(pattern.token_mask, Neighborhood1D)
    q, k, v = make_qkv(1, 2, 1, 80, 80, 32, seed=44)
    _flex_vs_reference(q, k, v, pattern, causal=False)


@pytest.mark.parametrize("case", ["causal_kvheads_pad", "noncausal_shared", "token_mask_wide", "broadcast_batch"])
def test_triton_split_lists_matches_eager(case):
    """On CUDA the tile split is one Triton launch (interpreted here); it must give exactly the eager lists."""
    from sparsa.ops import flex
    from sparsa.ops.vertical_slash import triton_available

    if not triton_available() or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("needs triton, and a GPU or TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(len(case))
    # 363 - 300 = 63: a row's first query sees the whole diagonal tile exactly (the full test's boundary).
    lq, lk, bs = {"noncausal_shared": (200, 200, 32), "causal_kvheads_pad": (300, 363, 64)}.get(case, (300, 517, 64))
    qb, kb = -(-lq // bs), -(-lk // bs)
    heads = {"causal_kvheads_pad": 2, "noncausal_shared": 1, "token_mask_wide": 8, "broadcast_batch": 2}[case]
    batch = 1 if case == "broadcast_batch" else 2
    p = BlockPattern.from_block_scores(torch.rand(batch, heads, qb, kb, generator=g), q_len=lq, kv_len=lk,
                                       block_q=bs, topk=3)
    num, idx = p.kv_num_blocks, p.kv_indices
    kv_full = block_ok = head_map = None
    causal, width = case != "noncausal_shared", idx.shape[-1]
    if case in ("causal_kvheads_pad", "broadcast_batch"):
        pad = torch.ones(2, lk, dtype=torch.bool)
        pad[1, :70] = False
        block_ok = torch.nn.functional.pad(pad, (0, kb * bs - lk)).view(2, kb, bs).all(-1)
        head_map = torch.arange(8) // 4
        if case == "broadcast_batch":
            num, idx = num.expand(2, -1, -1), idx.expand(2, -1, -1, -1)
    if case == "token_mask_wide":
        kv_full = torch.rand(idx.shape, generator=g) < 0.5
        width = kb + 5  # wider than the index lists (the CPU kernel's requirement)
    args = (num, idx, kv_full, block_ok, head_map, causal, bs, bs, lk - lq, lk, width)
    # Real Triton reads device memory only: on a GPU machine its inputs go to CUDA (the interpreter reads CPU ones).
    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    triton_args = tuple(a.cuda() if on_gpu and isinstance(a, torch.Tensor) else a for a in args)
    want, got = flex.split_lists(*args), [t.cpu() for t in flex.split_lists_triton(*triton_args)]
    for name, w, g_ in zip(("partial_num", "partial_idx", "full_num", "full_idx"), want, got):
        assert torch.equal(w.to(torch.int32), g_), name
    rows = num if head_map is None else num[:, head_map]
    assert int(got[0].sum() + got[2].sum()) == int(rows.sum())  # every selected tile lands in one list
    assert int(got[2].sum()) > 0 and int(got[0].sum()) > 0  # both lists are exercised


@pytest.mark.parametrize("block_q,block_k", [(64, 64), (128, 128), (64, 128), (128, 64), (32, 256)])
def test_fast_path_padding_keeps_block_counts(block_q, block_k):
    """The padded, bounds-check-free kernel walks ceil(padded / block) query blocks; the BlockMask holds
    ceil(len / block) rows. They must agree at every length (64-token blocks padded to 128 faulted on the H200)."""
    from sparsa.ops.flex import padding

    for lq in range(1, 700, 7):
        lk = lq + 37
        pad_q, pad_k = padding(lq, lk, block_q, block_k)
        assert (lq + pad_q) % block_q == 0 and (lk + pad_k) % block_k == 0
        assert (lq + pad_q) // block_q == -(-lq // block_q)
        assert (lk + pad_k) // block_k == -(-lk // block_k)


def test_fast_path_only_for_power_of_two_blocks():
    from sparsa.ops.flex import fast_path

    cuda = torch.device("cuda")
    assert not fast_path(BlockPattern.dense(300, block_q=96, block_k=96), None, cuda)
    assert fast_path(BlockPattern.dense(300, block_q=64), None, cuda)
    assert not fast_path(BlockPattern.dense(300, block_q=64), None, torch.device("cpu"))


def test_cpu_flex_failure_falls_back_to_reference(monkeypatch):
    """torch's CPU FlexAttention kernel can raise on dynamic shapes: the call (and later CPU calls) use the
    reference backend, with one warning, and the answer is the reference's."""
    from sparsa.ops import attention as att

    def broken(*args, **kwargs):
        raise RuntimeError("index out of bounds: 0 <= tmp30 < cur_qSplitSize")

    monkeypatch.setattr(att, "block_sparse_attention_flex", broken)
    monkeypatch.setattr(att, "_CPU_FLEX_FAILED", False)
    monkeypatch.setattr(att, "_warned", set())
    q, k, v = make_qkv(2, 4, 2, 100, 100, 32, seed=5)
    pattern = BlockPattern.streaming(100, 100, sink=4, window=20, block_q=32)
    want = block_sparse_attention(q, k, v, pattern, backend="reference")
    with pytest.warns(UserWarning, match="reference backend"):
        got = block_sparse_attention(q, k, v, pattern, backend="flex")
    torch.testing.assert_close(got, want)
    assert att._CPU_FLEX_FAILED
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later calls go straight to the reference
        torch.testing.assert_close(block_sparse_attention(q, k, v, pattern, backend="flex"), want)
