"""SALE's estimation pass: the Triton kernel (interpreted on the CPU) against the PyTorch reference."""

import os

import pytest
import torch

from sparsa.ops import sale_estimate
from sparsa.ops.sale_estimate import passing_tiles
from sparsa.ops.vertical_slash import triton_available
from sparsa.prefill.sale import SALE, _estimate_inputs

pytestmark = pytest.mark.skipif(not triton_available() or (not torch.cuda.is_available()
                                                          and os.environ.get("TRITON_INTERPRET") != "1"),
                                reason="needs triton, and a GPU or TRITON_INTERPRET=1")
# The interpreter runs on host tensors; compiled Triton needs device ones.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,block,scale", [
    (1, 2, 2, 128, 128, 32, 32, 1),  # GQA 1, lengths a multiple of the block
    (2, 4, 2, 100, 200, 64, 32, 1),  # batch 2, GQA 2, Lq < Lk, lengths not multiples of the block
    (1, 4, 1, 70, 70, 48, 16, 1),  # GQA 4 (4 heads per program), D not a power of two
    (2, 8, 1, 45, 83, 32, 16, 1),  # GQA 8: two 4-head programs per KV head; offset 38, not a block multiple
    (1, 3, 1, 50, 77, 16, 16, 1),  # GQA 3: one head per program
    (1, 4, 2, 60, 90, 32, 16, -1),  # a negative scale flips the comparison (the kernel takes the row min)
])
def test_triton_matches_naive(b, hq, hkv, lq, lk, d, block, scale):
    g = torch.Generator().manual_seed(lq + lk)
    q = torch.randn(b, hq, lq, d, generator=g).to(DEVICE)
    k = torch.randn(b, hkv, lk, d, generator=g).to(DEVICE)
    inputs = _estimate_inputs(q, k, block, 4)
    q_int, q_scale, k_int, k_scale, row_term, col_term = inputs
    # Thresholds just below the best estimate of a fifth of the rows and just above it for the rest: a tile
    # passes only where such a row's few largest estimates are, so the test tells tiles apart.
    est = (q_int.float() * q_scale[..., None]).view(b, hkv, hq // hkv, lq, d) @ (
        k_int.float() * k_scale.repeat_interleave(block, -1)[..., :lk, None])[:, :, None].transpose(-1, -2)
    est = (est.flatten(1, 2) + row_term[..., None] + col_term[:, :, None]) * scale * d ** -0.5
    hidden = torch.arange(lk, device=DEVICE)[None, :] > torch.arange(lq, device=DEVICE)[:, None] + (lk - lq)
    best = est.masked_fill(hidden, float("-inf")).amax(-1)
    need = best + (torch.rand(b, hq, lq, generator=g) - 0.2).to(DEVICE) / 8
    # Rows that never pass (+inf) and, in head 0 only, a few that pass on any visible key (-inf).
    need[..., ::7] = float("inf")
    need[:, 0, 5] = float("-inf")
    want = passing_tiles(*inputs, need, scale * d ** -0.5, block, backend="naive")
    got = passing_tiles(*inputs, need, scale * d ** -0.5, block, backend="triton")
    visible = passing_tiles(*inputs, torch.full_like(need, float("-inf")), 1.0, block, backend="naive")
    assert 0 < int(want.sum()) < int(visible.sum())  # the thresholds decide some visible tiles
    assert torch.equal(got, want)


def _zero_inputs(b, hq, hkv, lq, lk, d, block):
    """Inputs whose estimate is 0 everywhere: integers 0, scales 1, row and key terms 0."""
    kb = -(-lk // block)
    return dict(q_int=torch.zeros(b, hq, lq, d, dtype=torch.int8), q_scale=torch.ones(b, hq, lq),
                k_int=torch.zeros(b, hkv, lk, d, dtype=torch.int8), k_scale=torch.ones(b, hkv, kb),
                row_term=torch.zeros(b, hq, lq), col_term=torch.zeros(b, hq, lk))


def _both(inputs, need, block, scale=1.0):
    args = [t.to(DEVICE) for t in inputs.values()] + [need.to(DEVICE)]
    want = passing_tiles(*args, scale, block, backend="naive").cpu()
    got = passing_tiles(*args, scale, block, backend="triton").cpu()
    assert torch.equal(got, want)
    return got


@pytest.mark.parametrize("key", [53, 54, 20])
def test_one_element_passes(key):
    """One query-key pair passes, in one head of a 4-head group: the key on the query's position (its
    diagonal tile passes), one after it (causally hidden: nothing passes), or well before it (a tile every
    query of the block sees in full). Other heads of the group and other tiles stay clear."""
    b, hq, hkv, lq, lk, d, block = 1, 4, 1, 40, 72, 16, 16  # queries at positions 32..71
    x = _zero_inputs(b, hq, hkv, lq, lk, d, block)
    i, head = 21, 2  # position 53, in key block 3, not at a block edge
    x["q_int"][0, head, i, 5] = 3
    x["k_int"][0, 0, key, 5] = 2
    need = torch.full((b, hq, lq), 6.0)  # only the dot product 6 reaches it (a tie: >=, not >)
    got = _both(x, need, block)
    want = torch.zeros_like(got)
    if key <= i + lk - lq:
        want[0, head, i // block, key // block] = True
    assert torch.equal(got, want)


def test_one_key_term_at_a_block_edge():
    """A key term passes for every query that sees the key: the last key of each block, seen in its own
    (diagonal) tile only by that block's last query; a causal mask off by one either way fails."""
    b, hq, hkv, lq, lk, d, block = 1, 2, 2, 64, 64, 16, 16
    x = _zero_inputs(b, hq, hkv, lq, lk, d, block)
    x["col_term"][0, 1, block - 1::block] = 1.0
    need = torch.full((b, hq, lq), 1.0)
    got = _both(x, need, block)
    want = torch.zeros_like(got)
    want[0, 1] = torch.ones(lq // block, lk // block, dtype=torch.bool).tril()
    assert torch.equal(got, want)
    # One key earlier, the key is not its block's last: the last two queries of the block see it.
    x["col_term"].zero_()
    x["col_term"][0, 0, 2 * block - 2] = 1.0
    got = _both(x, need, block)
    want = torch.zeros_like(got)
    want[0, 0, 1:, 1] = True
    assert torch.equal(got, want)


def test_infinite_thresholds():
    """need = -inf passes every tile where that query sees a key; +inf never passes. The offset (8) is not a
    block multiple, so a block's last key block holds keys its first queries do not see: a -inf query there
    must not pass it."""
    b, hq, hkv, lq, lk, d, block = 2, 2, 1, 40, 48, 16, 16  # queries at positions 8..47
    x = _zero_inputs(b, hq, hkv, lq, lk, d, block)
    x["col_term"] = torch.full((b, hq, lk), 100.0)  # every estimate is large: only the thresholds matter
    need = torch.full((b, hq, lq), float("inf"))
    need[:, 1, 0] = float("-inf")  # query block 0 (positions 8..23): query 0 sees keys 0..8, key block 0
    need[:, 1, 17] = float("-inf")  # query block 1 (positions 24..39): query 17 sees keys 0..25, blocks 0-1
    got = _both(x, need, block)
    want = torch.zeros_like(got)
    want[:, 1, 0, :1] = True
    want[:, 1, 1, :2] = True
    assert torch.equal(got, want)


@pytest.mark.parametrize("lq,lk", [(40, 56), (33, 49), (16, 65), (48, 48)])
def test_every_visible_tile_at_minus_inf(lq, lk):
    """Every query at need = -inf: exactly the causally visible tiles pass, including a last key block that
    holds only the block's last query's own key (33/49 and 16/65) and a partial last query block."""
    b, hq, hkv, d, block = 1, 2, 1, 16, 16
    x = _zero_inputs(b, hq, hkv, lq, lk, d, block)
    got = _both(x, torch.full((b, hq, lq), float("-inf")), block)
    qb, kb = -(-lq // block), -(-lk // block)
    q_pos, k_pos = torch.arange(lq) + (lk - lq), torch.arange(lk)
    visible = k_pos[None, :] <= q_pos[:, None]
    visible = torch.nn.functional.pad(visible, (0, kb * block - lk, 0, qb * block - lq)).view(qb, block, kb, block)
    assert torch.equal(got, visible.any(3).any(1).expand_as(got))


def test_kernel_self_check_passes_and_catches_a_broken_kernel(monkeypatch):
    """On first use per device the kernel is checked against the reference; a wrong kernel is never used."""
    monkeypatch.setattr(sale_estimate, "_AGREES", {})
    assert sale_estimate.kernel_agrees(DEVICE, 64, 64)
    broken = lambda *args: ~sale_estimate.passing_tiles_naive(*args)  # noqa: E731
    monkeypatch.setattr(sale_estimate, "_passing_tiles_triton", broken)
    monkeypatch.setattr(sale_estimate, "_AGREES", {})
    with pytest.warns(UserWarning, match="failed its check"):
        assert not sale_estimate.kernel_agrees(DEVICE, 64, 64)
    assert not sale_estimate.kernel_agrees(DEVICE, 64, 64)  # remembered: one warning
