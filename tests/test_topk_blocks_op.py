"""The causal top-k block selection op: Triton kernel (interpreted on the CPU) against the PyTorch reference,
and the reference against the definition written out cell by cell."""

import os

import pytest
import torch

from sparsa.ops.topk_blocks import topk_blocks, topk_blocks_naive
from sparsa.ops.vertical_slash import triton_available

needs_triton = pytest.mark.skipif(not triton_available() or (not torch.cuda.is_available()
                                                             and os.environ.get("TRITON_INTERPRET") != "1"),
                                  reason="needs triton, and a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

CASES = [  # batch, heads, q_len, kv_len, block, topk, sink, local
    (2, 3, 100, 100, 16, 3, 1, 2),
    (1, 2, 70, 200, 16, 4, 0, 0),  # prefix keys (chunked prefill), lengths not multiples of the block
    (2, 2, 256, 256, 32, 2, 1, 1),
    (1, 1, 33, 33, 16, 10, 1, 2),  # budget above the candidates: every visible block
    (1, 4, 500, 1000, 64, 5, 2, 3),
    (1, 2, 40, 2100, 16, 7, 1, 2),  # 132 key blocks: a 256-wide row in the kernel
]


def by_definition(scores, topk, q_len, kv_len, block, sink, local):
    """The selection written out per row with Python sets, as the module docstring states it."""
    b, h, qb, kb = scores.shape
    rows = {}
    for bi in range(b):
        for hi in range(h):
            for r in range(qb):
                last = (min((r + 1) * block, q_len) - 1 + kv_len - q_len) // block
                forced = {j for j in range(last + 1) if j < sink or last - local <= j < last}
                cands = [j for j in range(last + 1) if j not in forced and scores[bi, hi, r, j] > float("-inf")]
                cands.sort(key=lambda j: (-scores[bi, hi, r, j].item(), j))
                rows[bi, hi, r] = sorted(set(cands[:topk]) | forced | {last})
    return rows


def random_scores(case, seed):
    b, h, lq, lk, block = case[:5]
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, -(-lq // block), -(-lk // block), generator=g)
    scores[0, 0, :, 1] = float("-inf")  # a key block of padding only: never routed to
    scores[-1, -1, :, :3] = 0.5  # ties: the lower block index wins
    return scores


@pytest.mark.parametrize("case", CASES[:4])
def test_naive_matches_definition(case):
    b, h, lq, lk, block, topk, sink, local = case
    scores = random_scores(case, 1)
    num, idx = topk_blocks_naive(scores, topk, q_len=lq, kv_len=lk, block=block, sink=sink, local=local)
    for (bi, hi, r), want in by_definition(scores, topk, lq, lk, block, sink, local).items():
        n = num[bi, hi, r].item()
        assert idx[bi, hi, r, :n].tolist() == want
        assert not idx[bi, hi, r, n:].any()  # the rest of the row is zero, as BlockPattern's lists are


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_naive(case):
    b, h, lq, lk, block, topk, sink, local = case
    for seed in (2, 3):  # fresh random scores
        scores = random_scores(case, seed).to(DEVICE)
        want = topk_blocks(scores, topk, q_len=lq, kv_len=lk, block=block, sink=sink, local=local, backend="naive")
        got = topk_blocks(scores, topk, q_len=lq, kv_len=lk, block=block, sink=sink, local=local, backend="triton")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_triton
def test_triton_reads_strided_and_low_precision_scores():
    scores = torch.randn(2, 8, 7, 7).to(DEVICE)
    view = scores[:, ::2]  # non-contiguous heads
    for s in (view, view.to(torch.bfloat16)):
        want = topk_blocks(s, 2, q_len=100, kv_len=100, block=16, sink=1, local=1, backend="naive")
        got = topk_blocks(s, 2, q_len=100, kv_len=100, block=16, sink=1, local=1, backend="triton")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_arguments_are_named():
    scores = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="scores must be"):
        topk_blocks(scores, 2, q_len=100, kv_len=100, block=16)
    with pytest.raises(ValueError, match="topk must be"):
        topk_blocks(scores, 0, q_len=64, kv_len=64, block=16)
    with pytest.raises(ValueError, match="sink must be"):
        topk_blocks(scores, 1, q_len=64, kv_len=64, block=16, sink=-1)
    with pytest.raises(ValueError, match="backend must be"):
        topk_blocks(scores, 1, q_len=64, kv_len=64, block=16, backend="cuda")
