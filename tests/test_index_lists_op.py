"""Candidate lists to index lists (``sparsa.ops.index_lists``, behind ``BlockPattern.from_index_lists``): the Triton
kernel (interpreted on the CPU) against the PyTorch reference, and the reference against its definition."""

import os

import pytest
import torch

from sparsa.ops.index_lists import index_lists, index_lists_naive
from sparsa.ops.vertical_slash import triton_available

needs_triton = pytest.mark.skipif(not triton_available() or (not torch.cuda.is_available()
                                                             and os.environ.get("TRITON_INTERPRET") != "1"),
                                  reason="needs triton, and a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def candidates(b, h, qb, c, kb, seed, dtype=torch.int64):
    """Rows of ``c`` candidates: distinct kept blocks in random order, unkept entries holding anything."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(max(kb, c), generator=g)[:c] for _ in range(b * h * qb)]).view(b, h, qb, c)
    idx = torch.where(idx < kb, idx, torch.randint(0, kb, idx.shape, generator=g))  # c > kb: repeats, unkept below
    keep = torch.rand(b, h, qb, c, generator=g) < 0.6
    for row in range(b * h * qb):  # a repeated block is kept at most once
        flat_i, flat_k = idx.view(-1, c)[row], keep.view(-1, c)[row]
        seen = set()
        for j in range(c):
            if flat_k[j] and int(flat_i[j]) in seen:
                flat_k[j] = False
            seen.add(int(flat_i[j])) if flat_k[j] else None
    return idx.to(dtype), keep


@pytest.mark.parametrize("b,h,qb,c,kb", [(2, 3, 4, 20, 40), (1, 2, 3, 37, 30), (2, 1, 5, 8, 8), (1, 1, 2, 1, 5)])
def test_naive_matches_definition(b, h, qb, c, kb):
    idx, keep = candidates(b, h, qb, c, kb, seed=c)
    num, out = index_lists_naive(idx, keep, kv_len=kb * 16 - 3, block=16)
    assert out.shape[-1] == min(c, kb) and out.dtype == num.dtype == torch.int32
    for row in range(b * h * qb):
        want = sorted(int(i) for i, k in zip(idx.view(-1, c)[row], keep.view(-1, c)[row]) if k)
        n = int(num.view(-1)[row])
        assert out.view(-1, out.shape[-1])[row, :n].tolist() == want and not out.view(-1, out.shape[-1])[row, n:].any()


@needs_triton
@pytest.mark.parametrize("b,h,qb,c,kb,dtype", [(2, 3, 4, 20, 40, torch.int64), (1, 2, 3, 37, 30, torch.int32),
                                                (2, 1, 5, 8, 8, torch.int64), (1, 4, 2, 70, 200, torch.int64)])
def test_triton_matches_naive(b, h, qb, c, kb, dtype):
    idx, keep = candidates(b, h, qb, c, kb, seed=c + 1, dtype=dtype)
    want = index_lists_naive(idx, keep, kv_len=kb * 16, block=16)
    got = index_lists(idx.to(DEVICE), keep.to(DEVICE), kv_len=kb * 16, block=16, backend="triton")
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@needs_triton
def test_hip_selects_the_same_pattern_with_the_triton_op(monkeypatch):
    from sparsa.ops import index_lists as op
    from sparsa.prefill.hip import HiP

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 300, 16, generator=g).to(DEVICE), torch.randn(2, 2, 500, 16, generator=g).to(DEVICE)
    sel = HiP(block=32, mask_k=128, query_samples=4)
    want = sel.select(q, k)
    saved, calls = op.index_lists, []
    monkeypatch.setattr(op, "index_lists", lambda *a, **kw: calls.append(1) or saved(*a, **{**kw, "backend": "triton"}))
    got = sel.select(q, k)
    assert calls and torch.equal(got.kv_num_blocks, want.kv_num_blocks) and torch.equal(got.kv_indices, want.kv_indices)


def test_bad_arguments():
    idx = torch.zeros(1, 1, 2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="idx must be"):
        index_lists(idx.float(), idx.bool(), kv_len=64, block=16)
    with pytest.raises(ValueError, match="keep must be"):
        index_lists(idx, idx.bool()[..., :2], kv_len=64, block=16)
