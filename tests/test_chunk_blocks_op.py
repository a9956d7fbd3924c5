"""LongHeads' chunk selection op: the Triton kernel (interpreted on the CPU) against the PyTorch reference, and the
reference against the selection written out per row with Python sets, as the module docstring states it."""

import os

import pytest
import torch

from sparsa.ops.chunk_blocks import chunk_blocks, chunk_blocks_naive, width
from sparsa.ops.vertical_slash import triton_available

needs_triton = pytest.mark.skipif(not triton_available() or (not torch.cuda.is_available()
                                                             and os.environ.get("TRITON_INTERPRET") != "1"),
                                  reason="needs triton, and a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

CASES = [  # batch, heads, q_len, kv_len, block, per, total, begin
    (2, 2, 400, 400, 16, 2, 4, 64),  # LongHeads' shape in small: dense rows, then selection
    (1, 2, 200, 1000, 16, 2, 5, 0),  # prefix keys at an offset that is not a multiple of the block
    (2, 1, 300, 300, 16, 1, 3, 100),  # one block per chunk
    (1, 2, 400, 400, 16, 3, 2, 0),  # three blocks per chunk, total 2: the forced chunks use the whole budget
    (2, 3, 700, 700, 32, 2, 64, 32),  # a budget larger than the chunk count: every candidate
    (1, 2, 40, 40, 16, 4, 4, 0),  # no complete chunk (C = 0): forced only
    (1, 1, 48, 3000, 16, 2, 6, 0),  # 188 key blocks: a 256-wide row in the kernel
]


def scores_for(case, seed, dead=False):
    b, h, lq, lk, block, per = case[:6]
    qb, n_chunks = -(-lq // block), lk // (per * block)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, h, qb, n_chunks, generator=g)
    if dead and n_chunks > 3:  # chunks of padding only score -inf; ties go to the lower chunk
        s[0, :, :, 2] = float("-inf")
        s[-1, -1, :, 1:4] = 0.5
    return s


def call(case, scores, backend):
    _, _, lq, lk, block, per, total, begin = case
    kw = dict(q_len=lq, kv_len=lk, block=block, per=per, total=total, begin=begin)
    if backend == "naive-direct":
        return chunk_blocks_naive(scores, **kw)
    return chunk_blocks(scores.to(DEVICE), backend=backend, **kw)


def by_definition(case, scores):
    b, h, lq, lk, block, per, total, begin = case
    qb, kb, off, span = -(-lq // block), -(-lk // block), lk - lq, per * block
    n_chunks = lk // span
    rows = {}
    for bi in range(b):
        for hi in range(h):
            for r in range(qb):
                first, lastq = r * block + off, min((r + 1) * block, lq) - 1 + off
                last = lastq // block
                visible = set(range(min(last + 1, kb)))
                if first < begin:
                    rows[bi, hi, r] = sorted(visible)
                    continue
                lo = max(first // span - 1, 1)
                loc = [c for c in range(lo, lo + 3) if c <= lastq // span]
                chunks = {0} | set(loc)
                n_top = min(max(total - 1 - len(loc), 0), min(total, n_chunks))
                cand = [c for c in range(1, first // span - 1) if c < n_chunks
                        and scores[bi, hi, r, c] > float("-inf")]
                cand.sort(key=lambda c: (-scores[bi, hi, r, c].item(), c))
                chunks |= set(cand[:n_top])
                rows[bi, hi, r] = sorted({c * per + i for c in chunks for i in range(per)} & visible)
    return rows


@pytest.mark.parametrize("case", CASES)
def test_naive_matches_definition(case):
    scores = scores_for(case, 1, dead=True)
    num, idx = call(case, scores, "naive-direct")
    assert idx.shape[-1] == width(*case[2:])
    for (bi, hi, r), want in by_definition(case, scores).items():
        n = num[bi, hi, r].item()
        assert idx[bi, hi, r, :n].tolist() == want
        assert not idx[bi, hi, r, n:].any()


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_naive(case):
    for seed, dead in ((2, False), (3, True))[-1 if case[0] * case[1] * case[2] > 300 else 0:]:  # fresh scores
        scores = scores_for(case, seed, dead)
        want, got = call(case, scores, "naive"), call(case, scores, "triton")
        assert torch.equal(got[0].cpu(), want[0].cpu()) and torch.equal(got[1].cpu(), want[1].cpu())


@needs_triton
def test_longheads_selects_the_same_pattern_with_the_triton_op(monkeypatch):
    from sparsa.ops import chunk_blocks as op
    from sparsa.prefill.longheads import LongHeads

    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 2, 300, 16, generator=g).to(DEVICE), torch.randn(2, 1, 600, 16, generator=g).to(DEVICE)
    real = torch.ones(2, 600, dtype=torch.bool, device=DEVICE)
    real[1, :200] = False
    sel = LongHeads(block=32, window_size=64, atten_length=256, begin_selective_length=128, query_samples=4)
    want = sel.select(q, k, key_padding_mask=real)
    saved = op.chunk_blocks
    monkeypatch.setattr("sparsa.prefill.longheads.chunk_blocks",
                        lambda *a, **kw: saved(*a, **{**kw, "backend": "triton"}))
    got = sel.select(q, k, key_padding_mask=real)
    assert torch.equal(got.kv_num_blocks, want.kv_num_blocks) and torch.equal(got.kv_indices, want.kv_indices)


def test_bad_arguments():
    s = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match="scores must be"):
        chunk_blocks(s, q_len=64, kv_len=64, block=16, per=1, total=2, begin=0)
    with pytest.raises(ValueError, match="total must be"):
        chunk_blocks(torch.zeros(1, 1, 4, 4), q_len=64, kv_len=64, block=16, per=1, total=0, begin=0)
