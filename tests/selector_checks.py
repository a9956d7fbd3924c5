"""Checks shared by the selector test files."""

import torch

from dense_reference import dense_attention
from sparsa.ops import block_sparse_attention
from sparsa.pattern import last_visible_block


def random_qkv(batch, hq, hkv, lq, lk, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, lq, dim, generator=g)
    k = torch.randn(batch, hkv, lk, dim, generator=g)
    v = torch.randn(batch, hkv, lk, dim, generator=g)
    return q, k, v


def dense_causal(q, k, v):
    """Bottom-right aligned causal attention (queries are the last Lq positions), float64."""
    lq, lk = q.shape[2], k.shape[2]
    mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
    return dense_attention(q, k, v, mask.expand(q.shape[0], q.shape[1], lq, lk))[0]


def check_rows(pattern):
    """validate() passes and every query block computes its diagonal (last visible) key block."""
    pattern.validate()
    assert bool((pattern.kv_num_blocks >= 1).all())
    blocks = pattern.to_block_mask()
    last = last_visible_block(pattern.q_len, pattern.kv_len, pattern.block_q, pattern.block_k)
    diag = blocks.gather(-1, last.view(1, 1, -1, 1).expand(*blocks.shape[:3], 1))
    assert bool(diag.all())
    causal = torch.arange(pattern.num_kv_blocks)[None, :] <= last[:, None]
    assert not bool((blocks & ~causal).any()), "a block after the diagonal was selected"


def assert_padding_ignored(sel, q, k, v, pad, rows, padded_only, n_pad):
    """A left-padded second sequence: real query blocks ``rows`` never select the padding-only key blocks
    ``padded_only`` (while the same inputs without the mask do, so the check can fail); the unpadded first
    sequence and an all-True mask give exactly the unmasked pattern; real rows' outputs are finite.
    Returns the padded pattern."""
    lq, lk = q.shape[2], k.shape[2]
    pattern = sel.select(q, k, key_padding_mask=pad)
    assert not bool(pattern.to_block_mask()[1, :, rows, padded_only].any()), "a padding-only block was picked"
    unmasked = sel.select(q, k)
    assert bool(unmasked.to_block_mask()[1, :, rows, padded_only].any())
    assert torch.equal(pattern.to_block_mask()[0], unmasked.to_block_mask()[0])
    assert torch.equal(sel.select(q, k, key_padding_mask=torch.ones_like(pad)).to_block_mask(),
                       unmasked.to_block_mask())
    assert sel.pattern(q, k, key_padding_mask=pad).to_block_mask().equal(pattern.to_block_mask())
    out = block_sparse_attention(q, k, v, pattern, key_padding_mask=pad, backend="reference")
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, :, max(n_pad - (lk - lq), 0):]).all()
    return pattern
