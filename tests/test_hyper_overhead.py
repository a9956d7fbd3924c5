"""HyperAttention's launch overhead: few ATen ops per call (on the GPU each costs a ~27 us launch), no host data
copied to the device once warm, and the same results as before those cuts."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sparsa.ops
from sparsa.prefill import hyper
from sparsa.prefill.hyper import Hyper

# Views and bare allocations launch no kernel.
FREE = {"view", "_unsafe_view", "expand", "slice", "select", "t", "transpose", "permute", "as_strided", "empty",
        "empty_like", "empty_strided", "detach", "alias", "unsqueeze", "squeeze", "reshape", "lift_fresh"}


class Ops(TorchDispatchMode):
    """Counts the kernel-launching ATen ops run under it, the largest tensor they return and the tensors they
    touch that are not on ``device`` (0-dim ones aside: Python scalars wrapped on the host)."""

    def __init__(self, device="meta"):
        super().__init__()
        self.device = torch.device(device)
        self.ops, self.largest, self.foreign = collections.Counter(), 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        self.foreign += [func.__name__ for t in tensors if t.device != self.device and t.dim() > 0]
        if func.overloadpacket.__name__ not in FREE:
            self.ops[func.overloadpacket.__name__] += 1
            self.largest = max([self.largest] + [t.nbytes for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


@pytest.fixture
def kernel_calls(monkeypatch):
    """The attention kernel replaced by empty results, so that only the method's own ops are counted."""
    calls = []

    def fake(q, k, v, pattern=None, *, return_lse=False, **kwargs):
        calls.append(q.shape)
        out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        return (out, torch.empty(q.shape[:3], device=q.device)) if return_lse else out

    monkeypatch.setattr(sparsa.ops, "block_sparse_attention", fake)
    return calls


def _warm_call(length, prefix=0, padded=False):
    """One ``attend`` at the benchmark geometry (B=1, 32/8 heads, D=128, bf16) on meta tensors, after a first
    call that fills the caches (as the first layer of a pass does for the shape-only tensors)."""
    q = torch.empty(1, 32, length, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 8, length + prefix, 128, dtype=torch.bfloat16, device="meta")
    mask = torch.ones(1, length + prefix, dtype=torch.bool, device="meta") if padded else None
    sel = Hyper()
    sel.attend(q, k, k, key_padding_mask=mask)
    with Ops() as ops:
        sel.attend(q, k, k, key_padding_mask=mask)
    return ops


# Counted before -> after the overhead cuts (kernel excluded): 8K 175 -> 60 (padded 181 -> 101), 32K 763 -> 197
# (padded 781 -> 312). The bounds leave a little room; a regression that adds a loop or rebuilds shape-only
# tensors per call fails.
@pytest.mark.parametrize("length,padded,bound", [(8192, False, 64), (8192, True, 106), (32768, False, 205)])
def test_ops_per_call(kernel_calls, length, padded, bound):
    ops = _warm_call(length, padded=padded)
    assert sum(ops.ops.values()) <= bound, ops.ops
    assert len(kernel_calls) == 2 * {8192: 2, 32768: 4}[length]  # leaves + one call per level, both calls


@pytest.mark.parametrize("prefix,padded", [(0, False), (0, True), (3000, False)])
def test_no_host_data_in_a_warm_call(kernel_calls, monkeypatch, prefix, padded):
    """Random draws, hyperplanes and tables are made once; a warm call touches no tensor off the device (a
    host-to-device copy blocks on CUDA) and builds none from host data."""
    def refuse(*args, **kwargs):
        raise AssertionError("host data copied in a warm call")

    q = torch.empty(1, 32, 8192, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 8, 8192 + prefix, 128, dtype=torch.bfloat16, device="meta")
    mask = torch.ones(1, 8192 + prefix, dtype=torch.bool, device="meta") if padded else None
    sel = Hyper()
    sel.attend(q, k, k, key_padding_mask=mask, layer_idx=5)
    monkeypatch.setattr(torch, "tensor", refuse)
    monkeypatch.setattr(torch, "as_tensor", refuse)
    with Ops() as ops:
        sel.attend(q, k, k, key_padding_mask=mask, layer_idx=5)
    assert not ops.foreign


def test_intermediates_linear_in_length(kernel_calls):
    """At 128K nothing is larger than the fp32 output itself; the sampled scores come in 256 MiB slices."""
    ops = _warm_call(131072)
    assert ops.largest <= 4 * 32 * 131072 * 128


# ------------------------------------------------------------------------------------------- same results
def _qkv(b, hq, hkv, lq, lk, d=16, seed=11):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g),
            torch.randn(b, hkv, lk, d, generator=g))


def _left_pad(b, lk, pads):
    mask = torch.ones(b, lk, dtype=torch.bool)
    for i, n in enumerate(pads):
        mask[i, :n] = False
    return mask


# (selector, (B, Hq, Hkv, Lq, Lk, D), seed, left padding, layer) -> (|out|, out . linspace(-1, 1), density), as
# computed by the implementation before the overhead cuts (per-level hashing, per-call draws, chunk loop).
_BEFORE = [
    (dict(min_seq_len=32, block_size=16, sample_size=16), (2, 8, 2, 250, 400, 16), 11, [30, 200], 3,
     (60.80877995457144, -369.80173597627515, 1.0)),
    (dict(min_seq_len=32, block_size=16, sample_size=16, seed=4), (2, 4, 4, 300, 300, 16), 11, None, None,
     (55.145213940073326, -215.86827294727408, 1.0)),
    (dict(min_seq_len=40, block_size=32, sample_size=24, lsh_num_projs=4), (1, 6, 3, 333, 333, 16), 11, None, 0,
     (42.66042486803135, 175.35729988619786, 1.0)),
    (dict(min_seq_len=128, block_size=32, sample_size=32), (1, 2, 1, 1000, 1000, 8), 12, None, None,
     (27.47071697224391, 89.39702942588286, 0.4418402777777778)),
]


@pytest.mark.parametrize("kwargs,shape,seed,pads,layer,before", _BEFORE)
def test_same_results_as_before(kwargs, shape, seed, pads, layer, before):
    """GQA, prefix KV, key padding, odd lengths, 3-4 levels, an exact last level: the same outputs (up to fp32
    rounding) and density as before; the draws are the same generator stream."""
    q, k, v = _qkv(*shape, seed=seed)
    mask = None if pads is None else _left_pad(shape[0], shape[4], pads)
    out, density = Hyper(**kwargs).attend(q, k, v, key_padding_mask=mask, backend="reference", layer_idx=layer)
    out = out.double()
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
    norm, dot, density_before = before
    assert float(out.norm()) == pytest.approx(norm, rel=1e-6)
    assert float((out * weights).sum()) == pytest.approx(dot, abs=1e-5 * norm)
    assert density == density_before


def test_sampled_slices_match_one_pass(monkeypatch):
    """Slicing the sampled scores (256 MiB each at scale) changes nothing but rounding."""
    q, k, v = _qkv(2, 8, 2, 250, 400)
    mask = _left_pad(2, 400, [30, 200])
    sel = Hyper(min_seq_len=32, block_size=16, sample_size=16)
    whole, _ = sel.attend(q, k, v, key_padding_mask=mask, backend="reference")
    monkeypatch.setattr(hyper, "_SAMPLE_BYTES", 4096)
    sliced, _ = sel.attend(q, k, v, key_padding_mask=mask, backend="reference")
    torch.testing.assert_close(sliced, whole, atol=1e-6, rtol=1e-6)


def test_draws_are_the_generator_stream():
    """Cached draws equal drawing hyperplanes, then each core's samples, from one seeded generator."""
    gen = torch.Generator().manual_seed(7)
    torch.randn(16, 5, generator=gen)
    cores = [(2, 4, 100), (4, 4, 50), (2, 4, 333)]
    draws = hyper._sample_draws(7, 16, 5, cores, 32, torch.device("cpu"))
    for (u, pick, nk), (b, h, n) in zip(draws, cores):
        want = torch.rand(b, h, 32, generator=gen, dtype=torch.float64)
        assert torch.equal(u, want) and nk == n
        assert torch.equal(pick, (want * n).long().clamp(max=n - 1))
