"""The Triton block-sparse attention kernel (``backend="triton"``, interpreted on the CPU) against the
plain-PyTorch reference, and against dense attention where the pattern is full."""

import os
import warnings

import pytest
import torch

from dense_reference import dense_attention, token_mask_of
from sparsa import BlockPattern
from sparsa.ops import attention, block_sparse_attention
from sparsa.ops.triton_attention import config
from sparsa.ops.vertical_slash import triton_available

needs_triton = pytest.mark.skipif(not triton_available() or (not torch.cuda.is_available()
                                                             and os.environ.get("TRITON_INTERPRET") != "1"),
                                  reason="needs triton, and a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _inputs(b, hq, hkv, lq, lk, d, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, dv or d, generator=g)
    return (t.to(DEVICE, dtype) for t in (q, k, v))


def _random_pattern(b, h, lq, lk, bq, bk, keep, seed):
    """A random causal pattern: each visible tile kept with probability ``keep`` (rows may be empty)."""
    g = torch.Generator().manual_seed(seed)
    qb, kb = -(-lq // bq), -(-lk // bk)
    mask = torch.rand(b, h, qb, kb, generator=g) < keep
    return BlockPattern.from_block_mask(mask, q_len=lq, kv_len=lk, block_q=bq, block_k=bk).to(DEVICE)


def _left_padding(b, lk, pad):
    real = torch.ones(b, lk, dtype=torch.bool, device=DEVICE)
    real[-1, :pad] = False
    return real


def _compare(q, k, v, pattern, *, causal=True, pad=None, tol=2e-5):
    kw = dict(causal=causal, key_padding_mask=pad, return_lse=True, validate=False)
    got, got_lse = block_sparse_attention(q, k, v, pattern, backend="triton", **kw)
    want, want_lse = block_sparse_attention(q, k, v, pattern, backend="reference", **kw)
    assert got.dtype == q.dtype and got.shape == want.shape and got_lse.dtype == torch.float32
    assert torch.equal(torch.isinf(got_lse), torch.isinf(want_lse)) and not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    live = torch.isfinite(want_lse)
    torch.testing.assert_close(got_lse[live], want_lse[live], rtol=tol, atol=tol)
    return got


@needs_triton
@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,bq,bk,heads,pad,seed", [
    (1, 2, 2, 128, 128, 32, 64, 64, 2, 0, 0),  # whole blocks, a pattern per head
    (2, 4, 2, 150, 250, 32, 64, 32, 2, 70, 1),  # GQA 2, per-KV-head pattern, prefix keys, left padding
    (2, 8, 2, 100, 100, 16, 32, 32, 8, 30, 2),  # GQA 4, per-query-head pattern, lengths off the block
    (3, 4, 1, 90, 300, 48, 32, 64, 1, 0, 3),  # MQA, one pattern for every head, head dim 48 (not a power of 2)
    (2, 2, 1, 40, 200, 16, 16, 16, 1, 120, 4),  # a batch-1 pattern for a batch of 2; padded query rows
])
def test_matches_reference(b, hq, hkv, lq, lk, d, bq, bk, heads, pad, seed):
    q, k, v = _inputs(b, hq, hkv, lq, lk, d, seed=seed)
    pattern = _random_pattern(b if seed % 2 else 1, heads, lq, lk, bq, bk, 0.5, seed)
    _compare(q, k, v, pattern, pad=_left_padding(b, lk, pad) if pad else None)


@needs_triton
def test_bf16_and_value_dim():
    q, k, v = _inputs(2, 4, 2, 130, 200, 32, dv=16, dtype=torch.bfloat16, seed=5)
    pattern = _random_pattern(2, 2, 130, 200, 64, 64, 0.6, 5)
    _compare(q, k, v, pattern, pad=_left_padding(2, 200, 50), tol=2e-2)


@needs_triton
def test_not_causal():
    q, k, v = _inputs(2, 2, 1, 96, 96, 16, seed=6)
    g = torch.Generator().manual_seed(6)
    mask = torch.rand(2, 2, 3, 3, generator=g) < 0.5  # all tiles, upper ones too
    pattern = BlockPattern.from_block_mask(mask, q_len=96, kv_len=96, block_q=32, block_k=32)
    _compare(q, k, v, pattern.to(DEVICE), causal=False, pad=_left_padding(2, 96, 20))


@needs_triton
def test_full_budget_is_dense_and_small_budget_differs():
    q, k, v = _inputs(2, 4, 2, 200, 260, 32, seed=7)
    real = _left_padding(2, 260, 40)
    dense = BlockPattern.dense(200, 260, block_q=64, block_k=64, device=DEVICE)
    got = block_sparse_attention(q, k, v, dense, backend="triton", key_padding_mask=real)
    want, _ = dense_attention(q, k, v, token_mask_of(dense.to("cpu"), 2, 4, 2, True, real.cpu()))
    torch.testing.assert_close(got.cpu(), want.to(got.dtype), rtol=2e-5, atol=2e-5)
    sparse = _random_pattern(1, 1, 200, 260, 64, 64, 0.3, 7)
    assert (block_sparse_attention(q, k, v, sparse, backend="triton", key_padding_mask=real) - got).abs().max() > 1e-2


@needs_triton
def test_empty_rows_give_zero_and_minus_inf():
    q, k, v = _inputs(1, 2, 2, 64, 64, 16, seed=8)
    num = torch.zeros(1, 2, 2, dtype=torch.int32)
    num[0, 0, 1] = 1
    idx = torch.zeros(1, 2, 2, 2, dtype=torch.int32)
    pattern = BlockPattern(num, idx, 32, 32, 64, 64).to(DEVICE)
    out, lse = block_sparse_attention(q, k, v, pattern, backend="triton", return_lse=True)
    assert (out[0, 1] == 0).all() and torch.isinf(lse[0, 1]).all() and (out[0, 0, :32] == 0).all()
    assert torch.isfinite(lse[0, 0, 32:]).all()


@needs_triton
def test_non_contiguous_inputs():
    """Hugging Face hands attention q/k/v as transposes of [B, L, H, D]: read through strides."""
    q, k, v = _inputs(2, 4, 2, 100, 100, 16, seed=9)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    pattern = _random_pattern(2, 2, 100, 100, 32, 32, 0.5, 9)
    torch.testing.assert_close(block_sparse_attention(qt, kt, vt, pattern, backend="triton"),
                               block_sparse_attention(q, k, v, pattern, backend="reference"), rtol=2e-5, atol=2e-5)


def test_config_declines_what_the_kernel_does_not_take():
    dense = BlockPattern.dense(100, 100, block_q=64, block_k=64)
    assert config(dense, 64, 64, torch.bfloat16) == dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    assert config(BlockPattern.dense(100, 100), 128, 128, torch.bfloat16)["BLOCK_M"] == 128
    assert config(dense, 64, 64, torch.float64) is None
    assert config(dense, 512, 512, torch.bfloat16) is None
    assert config(BlockPattern.dense(100, 100, block_q=24, block_k=24), 64, 64, torch.float16) is None
    assert config(BlockPattern.streaming(100, sink=4, window=16, block_q=32, block_k=32), 64, 64,
                  torch.float16) is None


def test_backend_choice_and_errors():
    q = torch.randn(1, 2, 64, 16, requires_grad=True)
    pattern = BlockPattern.dense(64, 64, block_q=32, block_k=32)
    with pytest.raises(ValueError, match="forward-only"):
        block_sparse_attention(q, q, q, pattern, backend="triton")
    with pytest.raises(ValueError, match="does not take this case"):
        block_sparse_attention(q.detach().double(), q.detach().double(), q.detach().double(), pattern,
                               backend="triton")
    # auto never picks triton off CUDA, nor where a gradient is needed, nor for short query runs (FlexAttention's
    # decoding kernel splits the keys across programs there)
    assert attention.select_backend("auto", q.detach(), pattern=pattern) == "reference"
    assert not attention._triton_applies(q, q, q, pattern)
    if triton_available():
        long_q = torch.randn(1, 2, 128, 16)
        assert attention._triton_applies(long_q, long_q, long_q, BlockPattern.dense(128, 128, block_q=32, block_k=32))
        short = torch.randn(1, 2, 127, 16)
        assert not attention._triton_applies(short, short, short, BlockPattern.dense(127, 127, block_q=32, block_k=32))


@needs_triton
def test_failed_kernel_warns_once_and_hands_over(monkeypatch):
    """A kernel that fails under ``auto`` must not take attention down: one warning, then FlexAttention."""
    from sparsa.ops import _fallback, triton_attention

    monkeypatch.setattr(_fallback, "_failed", {})
    monkeypatch.setattr(triton_attention, "block_sparse_attention_triton",
                        lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("boom")))
    monkeypatch.setattr(attention, "select_backend", lambda backend, *a, **kw: "triton")
    calls = []
    monkeypatch.setattr(attention, "block_sparse_attention_flex",
                        lambda q, *a, **kw: calls.append(1) or (torch.zeros_like(q), None))
    q, k, v = _inputs(1, 2, 2, 64, 64, 16)
    pattern = BlockPattern.dense(64, 64, block_q=32, block_k=32)
    with pytest.warns(UserWarning, match="using FlexAttention"):
        block_sparse_attention(q, k, v, pattern)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block_sparse_attention(q, k, v, pattern)
    assert len(calls) == 2
