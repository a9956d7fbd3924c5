"""The vertical/slash estimation op: Triton kernel (interpreted on the CPU) against the PyTorch reference."""

import os

import pytest
import torch

from sparsa.ops.vertical_slash import triton_available, vertical_slash_scores, vertical_slash_scores_naive

# Without a GPU the kernels run in Triton's interpreter; tests/conftest.py sets TRITON_INTERPRET=1 before Triton
# is imported (it is read when kernels are defined).
pytestmark = pytest.mark.skipif(not triton_available() or (not torch.cuda.is_available()
                                                          and os.environ.get("TRITON_INTERPRET") != "1"),
                                reason="needs triton, and a GPU or TRITON_INTERPRET=1")
# Real Triton reads device memory only: on a GPU machine the inputs go to CUDA (the interpreter reads CPU tensors).
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
# On the GPU, tl.dot multiplies fp32 inputs in TF32 (10-bit mantissa): probabilities then agree with the fp32
# reference to ~1.5e-3 relative (measured on the H200), which is plenty for choosing tiles. The interpreter is exact.
FP32_TOL = 3e-3 if DEVICE == "cuda" else 1e-5


@pytest.mark.parametrize("b,hq,hkv,p,lk,d,dtype", [
    (1, 2, 2, 16, 200, 32, torch.float32),
    (2, 4, 2, 24, 333, 64, torch.float32),
    (1, 8, 1, 64, 130, 128, torch.float32),
    (2, 4, 4, 7, 97, 48, torch.bfloat16),
    (1, 2, 1, 150, 2300, 32, torch.float32),  # three probe tiles, three key splits (16 tiles of 64 each)
])
def test_triton_matches_naive(b, hq, hkv, p, lk, d, dtype):
    g = torch.Generator().manual_seed(b * 100 + lk)
    q = torch.randn(b, hq, p, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(DEVICE, dtype)
    # Probes: the last p positions of a query chunk that ends at lk (prefix keys before them).
    q_pos = torch.arange(lk - p, lk, device=DEVICE)
    want_v, want_s = vertical_slash_scores_naive(q, k, q_pos, d ** -0.5)
    got_v, got_s = vertical_slash_scores(q, k, q_pos, d ** -0.5, backend="triton")
    tol = FP32_TOL if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got_v, want_v, atol=tol, rtol=tol)
    torch.testing.assert_close(got_s, want_s, atol=tol, rtol=tol)
    # Every probe's probabilities sum to 1, and each lands once in a column and once on a diagonal.
    assert torch.allclose(got_v.sum(-1), torch.full((b, hq), float(p), device=DEVICE), atol=1e-3)
    assert torch.allclose(got_s.sum(-1), torch.full((b, hq), float(p), device=DEVICE), atol=1e-3)


@pytest.mark.parametrize("slash_block", [1, 128])
def test_column_partials_match_the_reference_and_repeat(slash_block):
    """Column sums stored per probe tile and summed afterwards (``column_partials``) equal the reference, and two
    runs give the same column sums bit for bit."""
    from sparsa.ops.vertical_slash import _vertical_slash_triton

    g = torch.Generator().manual_seed(11)
    b, hq, hkv, lk, d = 1, 2, 1, 1000, 32
    q_pos = torch.cat([torch.arange(300, 364), torch.arange(600, 664), torch.arange(lk - 70, lk)]).to(DEVICE)
    q = torch.randn(b, hq, len(q_pos), d, generator=g).to(DEVICE)
    k = torch.randn(b, hkv, lk, d, generator=g).to(DEVICE)
    want_v, want_s = vertical_slash_scores_naive(q, k, q_pos, d ** -0.5)
    got_v, got_s = _vertical_slash_triton(q, k, q_pos, d ** -0.5, slash_block=slash_block, column_partials=True)
    torch.testing.assert_close(got_v, want_v, atol=FP32_TOL, rtol=FP32_TOL)
    pooled = torch.nn.functional.pad(want_s, (0, -lk % slash_block)).view(b, hq, -1, slash_block).sum(-1)
    torch.testing.assert_close(got_s, pooled, atol=FP32_TOL, rtol=FP32_TOL)
    again_v, _ = _vertical_slash_triton(q, k, q_pos, d ** -0.5, slash_block=slash_block, column_partials=True)
    assert torch.equal(again_v, got_v)


def test_scattered_probes_and_errors():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 20, 32, generator=g).to(DEVICE)
    k = torch.randn(1, 1, 300, 32, generator=g).to(DEVICE)
    q_pos = torch.cat([torch.arange(40, 50), torch.arange(290, 300)]).to(DEVICE)  # probes from two places
    want = vertical_slash_scores_naive(q, k, q_pos, 0.2)
    got = vertical_slash_scores(q, k, q_pos, 0.2, backend="triton")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=FP32_TOL, rtol=FP32_TOL)
    assert float(got[0][..., 51:290].sum()) > 0 and float(got[0][..., 300:].sum()) == 0
    with pytest.raises(ValueError, match="backend"):
        vertical_slash_scores(q, k, q_pos, 0.2, backend="cuda")


def test_selectors_give_the_same_pattern_with_the_triton_estimate(monkeypatch):
    """vertical_slash and flexprefill pick the same tiles whether the estimate runs in Triton or PyTorch."""
    from sparsa.ops import vertical_slash as op
    from sparsa.prefill.flexprefill import FlexPrefill
    from sparsa.prefill.vertical_slash import VerticalSlash

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 400, 32, generator=g).to(DEVICE)
    k = torch.randn(2, 2, 450, 32, generator=g).to(DEVICE)
    selectors = [VerticalSlash(vertical_size=20, slash_size=40, block=32),
                 FlexPrefill(gamma=0.6, min_budget=32, block=32),
                 VerticalSlash(vertical_size=20, slash_size=40, block=32, slash_tiles="weighted"),
                 FlexPrefill(gamma=0.6, min_budget=32, block=32, slash_tiles="weighted")]
    want = [s.select(q, k).to_block_mask() for s in selectors]
    real = op.vertical_slash_scores
    monkeypatch.setattr(op, "vertical_slash_scores", lambda *a, **kw: real(*a, **{**kw, "backend": "triton"}))
    got = [s.select(q, k).to_block_mask() for s in selectors]
    for a, b in zip(want, got):
        assert torch.equal(a, b)


def test_padded_keys_get_no_probability():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 16, 32, generator=g).to(DEVICE)
    k = torch.randn(2, 2, 150, 32, generator=g).to(DEVICE)
    pad = torch.ones(2, 150, dtype=torch.bool, device=DEVICE)
    pad[1, :90] = False  # left padding in the second sequence
    q_pos = torch.cat([torch.arange(40, 48), torch.arange(142, 150)]).to(DEVICE)  # some probes sit inside the padding
    want = vertical_slash_scores_naive(q, k, q_pos, 0.2, key_padding_mask=pad)
    got = vertical_slash_scores(q, k, q_pos, 0.2, backend="triton", key_padding_mask=pad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=FP32_TOL, rtol=FP32_TOL)
    assert float(want[0][1, :, :90].abs().sum()) == 0.0
    # Probes that see only padding contribute nothing; the others still sum to one each.
    torch.testing.assert_close(want[0][1].sum(-1), torch.full((4,), 8.0, device=DEVICE), atol=1e-4, rtol=0)


@pytest.mark.parametrize("slash_block,probes", [(16, "tail"), (32, "tail"), (16, "scattered"), (64, "tail"),
                                                (128, "tail"), (128, "scattered")])
def test_banded_slash_matches_pooled_reference(slash_block, probes):
    """Diagonal sums pooled in bands equal the pooled reference: a tile of consecutive probes meets two bands of 128
    diagonals (two sums), three of 64, more of 16 or 32 (one atomic per probability), as do scattered probes."""
    g = torch.Generator().manual_seed(slash_block)
    b, hq, hkv, lk, d = 2, 4, 2, 700, 32
    q_pos = torch.arange(lk - 90, lk) if probes == "tail" else torch.cat([torch.arange(100, 130), torch.arange(650, 700)])
    q_pos = q_pos.to(DEVICE)
    q = torch.randn(b, hq, len(q_pos), d, generator=g).to(DEVICE)
    k = torch.randn(b, hkv, lk, d, generator=g).to(DEVICE)
    pad = torch.ones(b, lk, dtype=torch.bool, device=DEVICE)
    pad[1, :50] = False
    want_v, want_s = vertical_slash_scores_naive(q, k, q_pos, d ** -0.5, key_padding_mask=pad)
    got_v, got_s = vertical_slash_scores(q, k, q_pos, d ** -0.5, backend="triton", key_padding_mask=pad,
                                         slash_block=slash_block)
    pooled = torch.nn.functional.pad(want_s, (0, -lk % slash_block)).view(b, hq, -1, slash_block).sum(-1)
    torch.testing.assert_close(got_v, want_v, atol=FP32_TOL, rtol=FP32_TOL)
    torch.testing.assert_close(got_s, pooled, atol=FP32_TOL, rtol=FP32_TOL)
    naive_v, naive_s = vertical_slash_scores(q, k, q_pos, d ** -0.5, backend="naive", key_padding_mask=pad,
                                             slash_block=slash_block)
    torch.testing.assert_close(naive_s, pooled)
    with pytest.raises(ValueError, match="slash_block"):
        vertical_slash_scores(q, k, q_pos, 0.2, slash_block=0)
