"""The Quest bound op (``sparsa.ops.quest``): Triton kernels (interpreted on the CPU) against the PyTorch
reference, and the selectors that use it (BiFormer's and LongHeads' ``scoring="bound"``)."""

import os

import pytest
import torch

from sparsa.ops import quest
from sparsa.ops.quest import quest_scores, quest_scores_naive
from sparsa.ops.vertical_slash import triton_available

# Without a GPU the kernels run in Triton's interpreter; tests/conftest.py sets TRITON_INTERPRET=1 before Triton
# is imported (it is read when kernels are defined).
needs_triton = pytest.mark.skipif(not triton_available() or (not torch.cuda.is_available()
                                                             and os.environ.get("TRITON_INTERPRET") != "1"),
                                  reason="needs triton, and a GPU or TRITON_INTERPRET=1")
# Real Triton reads device memory only: on a GPU machine the inputs go to CUDA (the interpreter reads CPU tensors).
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _inputs(b, hq, hkv, lq, lk, d, dtype=torch.float32, pad=0, seed=0):
    """Random q, k, and with ``pad`` > 0 a left-padded last sequence (its first ``pad`` keys): ``key_real``,
    ``query_real`` (the last ``lq`` entries), else None."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(DEVICE, dtype)
    if not pad:
        return q, k, None, None
    key_real = torch.ones(b, lk, dtype=torch.bool, device=DEVICE)
    key_real[-1, :pad] = False
    return q, k, key_real, key_real[:, lk - lq:]


def _assert_same(got, want, tol):
    """Same shape, -inf at the same places, finite entries close (``tol`` relative to the largest entry)."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    dead = torch.isinf(want)
    assert torch.equal(torch.isinf(got), dead) and not torch.isnan(got).any()
    scale = float(want[~dead].abs().max()) if (~dead).any() else 1.0
    torch.testing.assert_close(got[~dead], want[~dead], rtol=tol, atol=tol * scale)


@needs_triton
@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,block,samples,pad,per_head,pieces", [
    (1, 2, 2, 64, 64, 16, 16, 4, 0, False, 1),  # GQA 1, whole blocks
    (2, 4, 2, 100, 150, 32, 16, 5, 90, False, 1),  # GQA 2, left padding, prefix keys, short last blocks
    (2, 8, 2, 70, 200, 32, 32, 3, 120, False, 1),  # GQA 4, a query block of padding only
    (1, 8, 1, 90, 333, 16, 16, 16, 0, False, 1),  # GQA 8 x 16 samples: 128 rows per query block
    (2, 4, 2, 90, 128, 16, 16, 4, 60, True, 2),  # LongHeads: per head, max over pairs of key blocks
    (1, 4, 4, 77, 96, 32, 16, 16, 0, True, 3),  # pieces not a power of two
    (2, 4, 1, 40, 1500, 16, 16, 2, 700, True, 2),  # 47 output columns: two key tiles of 32
    (1, 2, 1, 50, 1100, 64, 16, 3, 0, False, 1),  # 69 key blocks: two key tiles of 64; D 64
    (1, 2, 2, 20, 40, 128, 16, 2, 0, False, 1),  # D 128
])
def test_triton_matches_naive(b, hq, hkv, lq, lk, d, block, samples, pad, per_head, pieces):
    q, k, key_real, query_real = _inputs(b, hq, hkv, lq, lk, d, pad=pad, seed=lk + hq)
    kw = dict(key_real=key_real, query_real=query_real, per_head=per_head, pieces=pieces)
    want = quest_scores_naive(q, k, block, samples, **kw)
    got = quest_scores(q, k, block, samples, backend="triton", **kw)
    _assert_same(got, want, 1e-5)
    qb, nb = -(-lq // block), -(-lk // block)
    assert got.shape == (b, hq if per_head else hkv, qb, nb // pieces)


@needs_triton
@needs_triton
@pytest.mark.parametrize("per_head,pieces", [(False, 1), (True, 2)])
def test_transposed_views_are_read_in_place(per_head, pieces):
    """A model hands attention ``[B, L, H, D]`` projections transposed to ``[B, H, L, D]``: the kernels read them
    through their strides (no copy) and give the contiguous inputs' answer."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 150, 4, 32, generator=g).to(DEVICE).transpose(1, 2)  # [B, Hq, Lq, D], strided
    k = torch.randn(2, 192, 2, 32, generator=g).to(DEVICE).transpose(1, 2)  # [B, Hkv, Lk, D], 12 blocks
    assert not q.is_contiguous() and not k.is_contiguous()
    kw = dict(per_head=per_head, pieces=pieces)
    want = quest_scores_naive(q.contiguous(), k.contiguous(), 16, 4, **kw)
    got = quest_scores(q, k, 16, 4, backend="triton", **kw)
    _assert_same(got, want, 1e-5)


@pytest.mark.parametrize("per_head,pieces", [(False, 1), (True, 2)])
def test_bf16_inputs(per_head, pieces):
    """bf16 q and k: the GPU's kernel takes bf16 dot products with float32 accumulation, the reference a bf16
    matmul (its scores rounded to bf16), so they agree to bf16's precision; the interpreter works in float32."""
    q, k, key_real, query_real = _inputs(2, 4, 1, 60, 320, 32, dtype=torch.bfloat16, pad=100, seed=7)
    kw = dict(key_real=key_real, query_real=query_real, per_head=per_head, pieces=pieces)
    _assert_same(quest_scores(q, k, 16, 4, backend="triton", **kw), quest_scores_naive(q, k, 16, 4, **kw), 1e-2)


@needs_triton
def test_padding_scores_minus_inf():
    """Key blocks of padding only score -inf for every query block; so does a query block whose sampled
    queries are all padding; a block with one real key, or one real sampled query, scores finite."""
    b, h, lq, lk, block = 2, 2, 64, 96, 16
    q, k, key_real, query_real = _inputs(b, h, h, lq, lk, 16, pad=49, seed=3)  # blocks 0-2 padding, 3 has 1 key
    kw = dict(key_real=key_real, query_real=query_real)
    got = quest_scores(q, k, block, 4, backend="triton", **kw)
    _assert_same(got, quest_scores_naive(q, k, block, 4, **kw), 1e-5)
    assert torch.isinf(got[1, :, :, :3]).all() and (got[1, :, :, :3] < 0).all()
    # Queries are keys 32..95: query block 0 (keys 32..47) is padding only; block 1 (48..63) has real samples.
    assert torch.isinf(got[1, :, 0]).all()
    assert torch.isfinite(got[1, :, 1:, 3:]).all() and torch.isfinite(got[0]).all()


def test_sampled_bounds_is_the_naive_path():
    """``estimate.sampled_bounds`` (auto backend) gives the reference's scores; ``block_bounds`` still imports
    from ``estimate``."""
    from sparsa.prefill.estimate import block_bounds, sampled_bounds

    q, k, key_real, query_real = _inputs(2, 4, 2, 100, 150, 32, pad=90, seed=1)
    kw = dict(key_real=key_real, query_real=query_real, per_head=True, pieces=2)
    got = sampled_bounds(q, k, 16, 5, **kw)
    want = quest_scores_naive(q, k, 16, 5, **kw)
    if DEVICE == "cpu":
        assert torch.equal(got, want)
    else:  # auto picks the kernel on the GPU
        _assert_same(got, want, 1e-5)
    assert block_bounds is quest.block_bounds


@needs_triton
@pytest.mark.parametrize("scoring", ["biformer", "longheads"])
def test_selectors_give_the_same_pattern_with_the_kernel(monkeypatch, scoring):
    """BiFormer and LongHeads (bound scoring, a left-padded sequence) pick the same blocks whether the bounds
    come from the kernel or from PyTorch."""
    from sparsa.prefill.biformer import BiFormer
    from sparsa.prefill.longheads import LongHeads

    if scoring == "biformer":
        sel = BiFormer(block=16, topk=2, query_samples=4)
    else:
        sel = LongHeads(block=16, window_size=32, atten_length=96, begin_selective_length=96, query_samples=4)
    q, k, key_real, _ = _inputs(2, 4, 2, 200, 300, 16, pad=70, seed=11)
    want = [sel.select(q, k).to_block_mask(), sel.select(q, k, key_padding_mask=key_real).to_block_mask()]
    calls = []
    real = quest.quest_scores

    def kernel(*args, **kwargs):
        calls.append(1)
        return real(*args, **{**kwargs, "backend": "triton"})

    monkeypatch.setattr(quest, "quest_scores", kernel)
    got = [sel.select(q, k).to_block_mask(), sel.select(q, k, key_padding_mask=key_real).to_block_mask()]
    assert len(calls) == 2
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert float(want[0].float().mean()) < 0.8  # sparse: the scores decided something


def test_errors():
    q, k, _, _ = _inputs(1, 2, 1, 32, 48, 16)
    with pytest.raises(ValueError, match="backend"):
        quest_scores(q, k, 16, 2, backend="cuda")
    with pytest.raises(ValueError, match="pieces"):
        quest_scores(q, k, 16, 2, pieces=2)  # 3 key blocks
