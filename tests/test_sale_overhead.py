"""SALE's estimation overhead, checked on the meta device (shapes, no data): its largest buffer grows with
``Lq * (sink + block + window)`` per head, never with ``Lq * window * D`` (a per-query copy of the window's keys
wrote 4.3 GB at 8K tokens on the H200), and a call copies nothing from the host (a blocking copy on CUDA)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sparsa.prefill.sale import SALE


class _Ops(TorchDispatchMode):
    """The largest tensor any op writes (views write nothing) and the ops that read a host tensor."""

    def __init__(self):
        super().__init__()
        self.largest, self.host_reads = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_flatten((args, kwargs))[0]):
            self.host_reads.append(str(func))
        if all(r.alias_info is None for r in func._schema.returns):
            sizes = [t.numel() * t.element_size() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize("window", [128, 512])
@pytest.mark.parametrize("padded", [False, True])
def test_sale_estimation_memory_is_linear_in_the_window(window, padded, monkeypatch):
    b, hq, hkv, length, d, block = 1, 32, 8, 4096, 128, 64
    q = torch.empty(b, hq, length, d, dtype=torch.bfloat16, device="meta")
    k = torch.empty(b, hkv, length, d, dtype=torch.bfloat16, device="meta")
    pad = torch.ones(b, length, dtype=torch.bool, device="meta") if padded else None
    sel = SALE(threshold=[0.01, 0.0], local_window=window, block=block)
    sel.select(q, k, layer_idx=0, key_padding_mask=pad)  # makes the cached shape-only tensors
    made = []  # torch.tensor / as_tensor copy host data without a dispatched op: watch them directly
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **kw: made.append(_name) or _real(*a, **kw))
    with _Ops() as ops:
        sel.select(q, k, layer_idx=0, key_padding_mask=pad)
    monkeypatch.undo()
    # fp32 scores of each query against its block's sink and window span, or q itself in fp32
    bound = 4 * b * hq * length * max(d, 2 * block + window)
    window_keys = 4 * b * hkv * length * window * d  # the per-query gather this replaced
    assert ops.largest <= bound < window_keys / 4, (ops.largest, bound)
    assert not ops.host_reads and not made, (ops.host_reads, made)
