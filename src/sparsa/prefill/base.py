"""The prefill selector interface."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..pattern import BlockPattern
from . import graphs

# Key length below which selectors hand over to dense attention by default (methods whose estimation costs
# more set their own). Measured on the H200 (BENCHMARKS.md, 2026-11-29; per layer, pattern and BlockMask cached,
# B=1, 32/8 heads, D=128, bf16) against torch's default SDPA, which picks cuDNN there (1.7-1.9x SDPA flash):
# the static selectors were 0.74-1.0x of it at 8K and 1.40-2.0x at 16K.
DEFAULT_DENSE_BELOW = 16384
_CACHE_SIZE = 8
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


@dataclass
class Selector:
    """A prefill method: looks at the queries and keys of one layer and returns the tiles to compute.

    ``select`` gets ``q [B, Hq, Lq, D]`` and ``k [B, Hkv, Lk, D]`` (after RoPE, GQA not repeated; queries are
    the last ``Lq`` positions). ``dense_below``: key length under which the caller uses dense attention.
    """

    name: ClassVar[str] = "selector"
    #: True when the pattern depends only on shapes (and the layer), not on the values of q and k: then it is
    #: built once and reused by every layer and forward pass with the same lengths.
    static: ClassVar[bool] = False
    #: with ``static``: whether the pattern differs per layer (part of the cache key)
    per_layer: ClassVar[bool] = False
    dense_below: int = DEFAULT_DENSE_BELOW
    #: run ``select`` through ``torch.compile`` (dynamic shapes) on CUDA: the estimation's ~100-200 small
    #: kernels become a few fused ones, cutting the per-layer launch overhead that makes dynamic methods lose to
    #: dense attention below ~32K. The first call per shape family compiles (seconds); any compile failure
    #: falls back to eager with one warning. Off by default until measured on the GPU. A string is a
    #: ``torch.compile`` mode: ``"reduce-overhead"`` also replays the estimation as a CUDA graph per shape.
    compile: bool | str = False
    #: replay each ``attend`` call (estimation, BlockMask and attention together) as a CUDA graph, one per call
    #: signature (shapes, layer, scale, backend, key padding): at short lengths the dynamic methods spend more time
    #: launching their 24-110 small kernels (~25 us each on the H200) than computing them. Cost: the first call
    #: of each new signature runs eagerly and the second captures (it synchronizes the device), and each graph
    #: holds its output buffers (a selector's graphs share one memory pool for their intermediates and one set
    #: of static input buffers per shape). Applies only to CUDA tensors, outside someone else's stream capture
    #: (``torch.cuda.is_current_stream_capturing()``, e.g. a caller capturing the whole forward
    #: pass), without autograd (inference only), and for key lengths up to ``graph_max_len``. A method that
    #: cannot be captured (a host sync inside) warns once and runs eagerly. See ``prefill/graphs.py``.
    cuda_graph: bool = False
    #: longest key length replayed as a graph: beyond it the attention's arithmetic dwarfs the launch overhead,
    #: and each graph's buffers grow with the length
    graph_max_len: int = 32768
    #: layer indices (0-based, as ``layer_idx``) computed densely, never by this method: several papers keep some
    #: layers dense (InfiniteHiP the first ones and the last, HyperAttention patches only the last layers of its
    #: LLM, Phi-3-small's S2-Attention every other layer). Through ``sparsa.configure`` such a layer runs the
    #: ``sdpa`` path, and ``attend`` with that ``layer_idx`` runs the dense pattern on sparsa's kernel. Its
    #: density, 1.0, counts in ``sparsa.stats``.
    dense_layers: tuple = ()

    def __post_init__(self):
        check_int(self, "dense_below", minimum=0)
        if not isinstance(self.compile, bool) and self.compile not in _COMPILE_MODES:
            raise ValueError(f"{self.name}: compile must be True, False or one of {_COMPILE_MODES}, "
                             f"got {self.compile!r}")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"{self.name}: cuda_graph must be True or False, got {self.cuda_graph!r}")
        check_int(self, "graph_max_len", minimum=1)
        layers = self.dense_layers
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)
        if not isinstance(layers, (list, tuple)) or any(
                not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
            raise ValueError(f"{self.name}: dense_layers must be a list of layer indices (ints >= 0), "
                             f"got {self.dense_layers!r}")
        self.dense_layers = tuple(sorted(set(layers)))

    def is_dense_layer(self, layer_idx) -> bool:
        """Whether ``dense_layers`` keeps this layer dense."""
        return layer_idx is not None and layer_idx in self.dense_layers

    def select(self, q: Tensor, k: Tensor, *, layer_idx: int | None = None) -> BlockPattern:
        raise NotImplementedError

    def pattern(self, q: Tensor, k: Tensor, *, layer_idx: int | None = None,
                key_padding_mask: Tensor | None = None) -> BlockPattern:
        """``select``, cached for static selectors (a few entries, keyed by shapes, device and layer).

        ``key_padding_mask [B, Lk]`` (True = real key) goes to selectors whose ``select`` takes it, so their
        estimates ignore padding; the kernel masks padded keys in any case.
        """
        if not self.static:
            kwargs = {"layer_idx": layer_idx}
            if key_padding_mask is not None and _takes_padding(type(self)):
                kwargs["key_padding_mask"] = key_padding_mask
            if self.compile and (q.is_cuda or self.__dict__.get("_compile_on_cpu")):
                return self._compiled_select(q, k, kwargs)
            return self.select(q, k, **kwargs)
        key = (q.shape[2], k.shape[2], q.shape[1], k.shape[1], str(q.device), layer_idx if self.per_layer else None)
        cache = self.__dict__.setdefault("_patterns", {})
        if key not in cache:
            if len(cache) >= _CACHE_SIZE and not self.per_layer:
                cache.pop(next(iter(cache)))
            cache[key] = self.select(q, k, layer_idx=layer_idx)
        return cache[key]

    def _compiled_select(self, q: Tensor, k: Tensor, kwargs: dict) -> BlockPattern:
        fn = self.__dict__.get("_select_compiled")
        if fn is None:
            mode = self.compile if isinstance(self.compile, str) else None
            fn = self.__dict__["_select_compiled"] = torch.compile(self.select, dynamic=True, mode=mode)
        try:
            return fn(q, k, **kwargs)
        except Exception as error:  # a compiler failure must not take attention down
            import warnings

            warnings.warn(f"sparsa: {self.name}: torch.compile of select() failed ({type(error).__name__}: "
                          f"{str(error)[:200]}); running it eagerly", stacklevel=3)
            self.compile = False
            return self.select(q, k, **kwargs)

    def __call__(self, q: Tensor, k: Tensor, *, layer_idx: int | None = None) -> BlockPattern:
        return self.select(q, k, layer_idx=layer_idx)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
               key_padding_mask: Tensor | None = None, backend: str = "auto",
               layer_idx: int | None = None) -> tuple[Tensor, "float | Tensor"]:
        """Causal attention under this method: ``(out [B, Hq, Lq, Dv], density)``; the density may be a 0-dim
        tensor (read it with ``float()``), so the forward pass never waits on the device to report it.

        The computation is ``_attend``; with ``cuda_graph`` this replays it as a CUDA graph where that applies.
        """
        if self.is_dense_layer(layer_idx):
            from ..ops import block_sparse_attention

            pattern = BlockPattern.dense(q.shape[2], k.shape[2], device=q.device)
            out = block_sparse_attention(q, k, v, pattern, causal=True, scale=scale,
                                         key_padding_mask=key_padding_mask, backend=backend, validate=False)
            return out, 1.0
        if self.cuda_graph and graphs.applies(self, q, k, v, key_padding_mask):
            return graphs.attend(self, q, k, v, scale=scale, key_padding_mask=key_padding_mask, backend=backend,
                                 layer_idx=layer_idx)
        return self._attend(q, k, v, scale=scale, key_padding_mask=key_padding_mask, backend=backend,
                            layer_idx=layer_idx)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                key_padding_mask: Tensor | None = None, backend: str = "auto",
                layer_idx: int | None = None) -> tuple[Tensor, "float | Tensor"]:
        """``attend``'s computation: the pattern, then the block-sparse kernel.

        Pattern methods need not override it. A method whose computation is not one block pattern (e.g.
        HyperAttention's sorted buckets merged by log-sum-exp) overrides it and reports the fraction of causal
        (query, key) tiles it computed as its density.
        """
        from ..ops import block_sparse_attention

        pattern = self.pattern(q, k, layer_idx=layer_idx, key_padding_mask=key_padding_mask)
        out = block_sparse_attention(q, k, v, pattern, causal=True, scale=scale, key_padding_mask=key_padding_mask,
                                     backend=backend, validate=False)
        return out, pattern.density_tensor()


@functools.lru_cache(maxsize=None)
def _takes_padding(cls) -> bool:
    return "key_padding_mask" in inspect.signature(cls.select).parameters


def check_int(obj, field: str, minimum: int = 1):
    value = getattr(obj, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{obj.name}: {field} must be an int >= {minimum}, got {value!r}")


def check_samples(obj, field: str = "query_samples"):
    """An int in [1, block]: queries sampled per query block."""
    check_int(obj, field)
    if getattr(obj, field) > obj.block:
        raise ValueError(f"{obj.name}: {field} must be <= block ({obj.block}), got {getattr(obj, field)}")


def check_block(obj, field: str = "block"):
    value = getattr(obj, field)
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{obj.name}: {field} must be a power of two >= 16, got {value!r}")
