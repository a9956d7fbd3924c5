"""Tensors that depend only on lengths, block sizes and the device (index ranges, causal block maps), made once
and shared.

On the GPU a selector's estimation is bound by kernel launches, not arithmetic: about 27 us per launch on the
H200, and over half of the launches built such shape-only tensors again on every call (a profile of one
``pattern()`` call per selector, 2026-11-29). Cached tensors are shared between callers: never modify one in
place.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

_CACHE: OrderedDict = OrderedDict()
MAX_ENTRIES = 512  # a sweep over lengths x block sizes x devices stays far below this


def shape_constant(key: tuple, make: Callable[[], Tensor]) -> Tensor:
    """``make()``, cached under ``key`` (which must name everything the tensor depends on, device included).

    Not cached while tracing for torch.compile or capturing a CUDA graph: a tensor made inside a graph must
    not outlive it."""
    if _tracing():
        return make()
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    made = make()
    if not is_fake(made):  # a fake tensor (torch.export, shape propagation) belongs to its tracing session
        _CACHE[key] = made
        if len(_CACHE) > MAX_ENTRIES:
            _CACHE.popitem(last=False)
    return made


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def device_key(device) -> str:
    """A hashable name for a device (``torch.device('cuda')`` and ``'cuda:0'`` may differ; both are fine)."""
    return str(torch.device(device) if device is not None else torch.device("cpu"))
