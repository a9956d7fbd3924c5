"""Tensors that depend only on lengths, block sizes and the device (index ranges, causal block maps), made once
and shared.

On the GPU a selector's estimation is bound by kernel launches, not arithmetic: about 27 us per launch on the
H200, and over half of the launches built such shape-only tensors again on every call (a profile of one
``pattern()`` call per selector, 2026-11-29). Cached tensors are shared between callers: never modify one in
place.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

_CACHE: OrderedDict = OrderedDict()
MAX_ENTRIES = 512  # a sweep over lengths x block sizes x devices stays far below this
# Some entries are large (SALE's anchor mask is 33 MB at 128K tokens): least recently used entries go first once
# the cache holds this much, so a long sweep over lengths cannot pile up device memory.
MAX_BYTES = 1 << 30
_bytes = 0
_PINNED: set = set()  # entries a captured CUDA graph reads


def shape_constant(key: tuple, make: Callable[[], object]):
    """``make()``, cached under ``key`` (which must name everything the tensor depends on, device included).

    While torch.compile traces, nothing is cached (the traced graph makes its own). While a CUDA graph is being
    captured, a cached entry is used and pinned (the graph reads its memory on every replay, so it is never
    evicted), and a missing one is made inside the graph without being cached (it belongs to the graph)."""
    if torch.compiler.is_compiling():
        return make()
    capturing = _capturing()
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        if capturing:
            _PINNED.add(key)
        return hit
    made = make()
    if not capturing and not any(is_fake(t) for t in _tensors(made)):  # fake tensors (torch.export, shape
        # propagation) belong to their tracing session
        _store(key, made)
    return made


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _store(key: tuple, value) -> None:
    global _bytes
    _CACHE[key] = value
    _bytes += _size(value)
    for old in list(_CACHE):  # least recently used first
        if len(_CACHE) <= MAX_ENTRIES and _bytes <= MAX_BYTES:
            break
        if old != key and old not in _PINNED:
            _bytes -= _size(_CACHE.pop(old))


def _size(value) -> int:
    """Device bytes held by a cached value."""
    return sum(t.numel() * t.element_size() for t in _tensors(value) if t.device.type != "meta")


def _tensors(value):
    """The tensors of a cached value: a tensor, or a tuple, list, dict or dataclass (a BlockPattern) of them."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list, dict)):
        for item in (value.values() if isinstance(value, dict) else value):
            yield from _tensors(item)
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))


def clear() -> None:
    """Drop every cached tensor that no captured CUDA graph reads (e.g. to hand device memory back)."""
    global _bytes
    for key in [k for k in _CACHE if k not in _PINNED]:
        _bytes -= _size(_CACHE.pop(key))


def device_key(device) -> str:
    """A hashable name for a device (``torch.device('cuda')`` and ``'cuda:0'`` may differ; both are fine)."""
    return str(torch.device(device) if device is not None else torch.device("cpu"))
