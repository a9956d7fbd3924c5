"""HiP's bound-scored tree search as a Triton kernel (``sparsa.ops.hip_search``, interpreted on the CPU) against the
selector's PyTorch search: the same kept nodes and the same pattern on fresh random inputs."""

import os

import pytest
import torch

from sparsa.ops import hip_search
from sparsa.ops.vertical_slash import triton_available
from sparsa.prefill.hip import HiP

# Without a GPU the kernels run in Triton's interpreter; tests/conftest.py sets TRITON_INTERPRET=1 before Triton
# is imported (it is read when kernels are defined).
needs_triton = pytest.mark.skipif(not triton_available() or (not torch.cuda.is_available()
                                                             and os.environ.get("TRITON_INTERPRET") != "1"),
                                  reason="needs triton, and a GPU or TRITON_INTERPRET=1")
# Real Triton reads device memory only: on a GPU machine the inputs go to CUDA (the interpreter reads CPU tensors).
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _inputs(b, hq, hkv, lq, lk, d, pad=0, dtype=torch.float32, seed=0):
    """Random q, k and, with ``pad`` > 0, a left-padded last sequence (its first ``pad`` keys), else None."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(DEVICE, dtype)
    real = None
    if pad:
        real = torch.ones(b, lk, dtype=torch.bool, device=DEVICE)
        real[-1, :pad] = False
    return q, k, real


def _both(monkeypatch, sel, q, k, real):
    """``sel.select`` with the search on each backend: ``{backend: (pattern, kept nodes)}``; fails unless the
    search ran (levels > 0)."""
    real_op = hip_search.hip_search
    out = {}
    for backend in ("naive", "triton"):
        seen = []

        def op(*args, **kwargs):
            seen.append(real_op(*args, **{**kwargs, "backend": backend}))
            return seen[-1]

        monkeypatch.setattr(hip_search, "hip_search", op)
        pattern = sel.select(q, k, key_padding_mask=real)
        assert len(seen) == 1, "the geometry needs at least one level of search"
        out[backend] = (pattern, seen[0])
    return out


def _alive_sorted(nodes, real, block):
    """The kept live ranges of each row (holding a real key) as a sorted ``[..., k]`` key, dead ones last: the
    reference keeps ranges best first with ties in ``torch.topk``'s order, which only matters among the dead (all
    ``-inf``; they never reach the pattern)."""
    lo, hi = nodes.unbind(-1)
    live = hi > lo
    if real is not None:  # [B, Kb + 1] real blocks before each block
        kb = -(-real.shape[1] // block)
        blocks = torch.nn.functional.pad(real, (0, kb * block - real.shape[1])).view(len(real), kb, block).any(-1)
        before = torch.nn.functional.pad(blocks.long().cumsum(-1), (1, 0))[:, None, None, :]
        before = before.expand(*lo.shape[:-1], -1)
        live = live & (torch.gather(before, -1, hi) > torch.gather(before, -1, lo))
    key = torch.where(live, lo * 1_000_000 + hi, torch.iinfo(torch.long).max)
    return key.sort(-1).values


# b, hq, hkv, lq, lk, d, block, mask_k, sliding_window, query_samples, pad
CASES = [
    (1, 2, 2, 200, 200, 16, 16, 48, 16, 4, 0),  # GQA 1, k = 3 (not a power of two)
    (2, 4, 2, 100, 333, 32, 16, 48, 16, 5, 150),  # GQA 2, left padding, prefix keys, short last block
    (1, 8, 2, 300, 300, 16, 16, 64, 0, 4, 0),  # GQA 4, no window block: causal masking of samples
    (2, 8, 2, 250, 250, 16, 16, 32, 0, 3, 100),  # GQA 4, padding without a window, query blocks of padding
    (1, 2, 1, 130, 1000, 16, 64, 128, 64, 16, 0),  # block 64, 16 samples, three levels
    (1, 4, 2, 200, 2000, 16, 128, 256, 128, 16, 0),  # block 128, prefix keys
    (2, 4, 2, 60, 1100, 16, 32, 64, 0, 4, 500),  # padding past the first levels' nodes, no window
    (1, 4, 1, 160, 500, 16, 32, 32, 32, 8, 0),  # k = 1, GQA 4 on one KV head
    (1, 2, 2, 96, 900, 16, 16, 80, 16, 2, 0),  # k = 5, two samples
]


@needs_triton
@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,block,mask_k,window,samples,pad", CASES)
def test_triton_matches_naive(monkeypatch, b, hq, hkv, lq, lk, d, block, mask_k, window, samples, pad):
    q, k, real = _inputs(b, hq, hkv, lq, lk, d, pad=pad, seed=lk + hq + pad)
    sel = HiP(block=block, mask_k=mask_k, sliding_window=window, sink=4, query_samples=samples)
    got = _both(monkeypatch, sel, q, k, real)
    (want, want_nodes), (have, have_nodes) = got["naive"], got["triton"]
    assert have_nodes.shape == want_nodes.shape and have_nodes.dtype == torch.long
    assert torch.equal(_alive_sorted(have_nodes, real, block), _alive_sorted(want_nodes, real, block))
    assert torch.equal(have.kv_num_blocks, want.kv_num_blocks) and torch.equal(have.kv_indices, want.kv_indices)


@needs_triton
def test_bf16_inputs(monkeypatch):
    q, k, real = _inputs(2, 4, 2, 120, 400, 32, pad=90, dtype=torch.bfloat16, seed=3)
    got = _both(monkeypatch, HiP(block=16, mask_k=48, sliding_window=16, sink=4, query_samples=4), q, k, real)
    assert torch.equal(got["triton"][0].kv_indices, got["naive"][0].kv_indices)


def test_auto_on_cpu_and_large_searches_use_the_reference():
    """``auto`` takes the reference for CPU tensors; so does ``triton`` for more kept nodes or sampled rows than one
    program holds, and for float64."""
    q, k, _ = _inputs(1, 2, 1, 64, 64, 16, dtype=torch.float64)
    nodes = torch.zeros(4, 2, 2, dtype=torch.long)
    kw = dict(block=16, samples=4, widest=4, causal=False, reference=lambda: "reference")
    assert hip_search.hip_search(q.float().cpu(), k.float().cpu(), nodes, 1, **kw) == "reference"
    assert hip_search.hip_search(q, k, nodes, 1, backend="triton", **kw) == "reference"  # float64
    wide = torch.zeros(4, hip_search._MAX_TOPK + 1, 2, dtype=torch.long)
    assert hip_search.hip_search(q.float(), k.float(), wide, 1, backend="triton", **kw) == "reference"
    with pytest.raises(ValueError, match="backend must be"):
        hip_search.hip_search(q, k, nodes, 1, backend="cuda", **kw)


@needs_triton
def test_transposed_views_are_read_in_place(monkeypatch):
    """A model's q and k arrive as ``[B, L, H, D]`` projections transposed to ``[B, H, L, D]``: the kernels read
    them through their strides (no copy) and keep the reference's pattern."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 100, 4, 32, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 333, 2, 32, generator=g).to(DEVICE).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    real = torch.ones(2, 333, dtype=torch.bool, device=DEVICE)
    real[-1, :150] = False
    got = _both(monkeypatch, HiP(block=16, mask_k=48, sliding_window=16, sink=4, query_samples=5), q, k, real)
    assert torch.equal(got["triton"][0].kv_indices, got["naive"][0].kv_indices)
    assert torch.equal(got["triton"][0].kv_num_blocks, got["naive"][0].kv_num_blocks)
