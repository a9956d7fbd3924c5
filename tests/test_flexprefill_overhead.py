"""FlexPrefill's estimation is launch-bound on the GPU (~28 us per ATen op on the H200): guard its op count and
that it never waits on the device."""

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsa.prefill.flexprefill import FlexPrefill

# Views and bare allocations launch no kernel.
FREE = {"view", "_unsafe_view", "expand", "slice", "select", "t", "transpose", "permute", "as_strided", "empty",
        "empty_like", "empty_strided", "detach", "alias", "unsqueeze", "squeeze", "reshape", "lift_fresh"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in FREE:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _meta_qkv(b, length):
    q = torch.empty(b, 32, length, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(b, 8, length, 128, dtype=torch.bfloat16, device="meta")
    return q, k


def test_op_count_at_8k():
    """115 ATen ops at 8K tokens on the reference path (127 before the repeated sorts, tile maps and pools
    were shared; 111 before the selection became sparsa.ops.vertical_slash_blocks, whose reference sorts the
    slash scores once more; 114 with ``slash_tiles=2``, which needs no block-diagonal scores). On CUDA the probe
    scores and the selection are Triton launches instead."""
    sel = FlexPrefill(dense_below=0)
    q, k = _meta_qkv(1, 8192)
    sel.select(q, k)  # fills the shape caches, as the first layer of a pass does
    with OpCounter() as counter:
        sel.select(q, k)
    assert sum(counter.ops.values()) <= 115, counter.ops


def test_no_host_sync_above_32k():
    """Above 2**16 query x key blocks (32K tokens) the query-aware map used to be built only after asking the
    device whether any head needed it; meta tensors raise on any such read."""
    sel = FlexPrefill(dense_below=0)
    q, k = _meta_qkv(2, 40000)
    blocks = -(-40000 // sel.block)
    assert blocks * blocks > 1 << 16
    pad = torch.empty(2, 40000, dtype=torch.bool, device="meta")
    pattern = sel.pattern(q, k, key_padding_mask=pad)
    assert pattern.kv_indices.shape == (2, 32, blocks, blocks)
