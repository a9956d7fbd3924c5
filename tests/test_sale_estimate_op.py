"""SALE's estimation pass: the Triton kernel (interpreted on the CPU) against the PyTorch reference."""

import os

import pytest
import torch

from sparsa.ops.sale_estimate import passing_tiles
from sparsa.ops.vertical_slash import triton_available
from sparsa.prefill.sale import SALE, _estimate_inputs

pytestmark = pytest.mark.skipif(not triton_available() or (not torch.cuda.is_available()
                                                          and os.environ.get("TRITON_INTERPRET") != "1"),
                                reason="needs triton, and a GPU or TRITON_INTERPRET=1")
# The interpreter runs on host tensors; compiled Triton needs device ones.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,block", [(1, 2, 2, 128, 128, 32, 32), (2, 4, 2, 100, 200, 64, 32),
                                                    (1, 4, 1, 70, 70, 48, 16)])
def test_triton_matches_naive(b, hq, hkv, lq, lk, d, block):
    g = torch.Generator().manual_seed(lq + lk)
    q = torch.randn(b, hq, lq, d, generator=g).to(DEVICE)
    k = torch.randn(b, hkv, lk, d, generator=g).to(DEVICE)
    inputs = _estimate_inputs(q, k, block, 4)
    # Thresholds near the middle of the logit range so that both outcomes occur.
    need = (torch.randn(b, hq, lq, generator=g) * 0.5 + 1.0).to(DEVICE)
    want = passing_tiles(*inputs, need, d ** -0.5, block, backend="naive")
    got = passing_tiles(*inputs, need, d ** -0.5, block, backend="triton")
    assert 0 < int(want.sum()) < want.numel()
    assert torch.equal(got, want)


def test_sale_selector_same_pattern_with_triton(monkeypatch):
    from sparsa.ops import sale_estimate

    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 200, 32, generator=g).to(DEVICE), torch.randn(1, 2, 200, 32, generator=g).to(DEVICE)
    sel = SALE(threshold=0.2, local_window=32, block=32)
    real = sale_estimate.passing_tiles
    patterns = []
    for backend in ("naive", "triton"):  # "auto" would pick Triton for both on a GPU
        monkeypatch.setattr("sparsa.prefill.sale.passing_tiles", lambda *a, _b=backend, **kw: real(*a, backend=_b))
        patterns.append(sel.select(q, k).to_block_mask())
    assert torch.equal(*patterns)
