"""A prefill method's whole attention call replayed as a CUDA graph (``Selector(cuda_graph=True)``).

Why: at short lengths the dynamic methods are bound by kernel launches, not arithmetic. At 8K tokens on the H200
a call is 24-110 small kernels (estimation, BlockMask, FlexAttention) at ~25 us of launch each, so none reached
1.5x SDPA flash there. A CUDA graph launches the recorded kernels as one unit.

Policy, per selector and per call signature (:func:`graph_key`: the inputs' shapes, strides, dtypes and device,
the scale, the backend, the layer, whether a key padding mask is given and its shape):

1. the first call runs eagerly, on a side stream. That is the warm-up capture needs: it compiles FlexAttention
   and the Triton kernels, fills the shape-constant cache (``sparsa._shapes``; a captured graph then reads those
   entries, which pins them) and sets up cuBLAS for the stream the capture will use;
2. the second call captures the call into a graph that reads static input buffers, then replays it;
3. later calls copy their inputs into the static buffers and replay.

Replayed results are clones: the graph writes its output in place on every replay, and callers keep outputs.
All graphs of a selector share one memory pool (their intermediates are dead between replays) and, per input
layout, one set of static q, k and v buffers (every layer of a model has the same layout). Both assume that one
selector's replays never run concurrently on different streams (a forward pass runs its layers in order on one
stream). At most ``MAX_GRAPHS`` signatures are kept, least recently used dropped first (a model with more layers
than that at one shape keeps running eagerly rather than capturing over and over).

A method that synchronizes with the host (``.item()``, ``.cpu()``, a branch on a tensor's value) cannot be
captured. That shows at capture time: one warning, the graph path is switched off for the selector
(``cuda_graph`` becomes False) and the call's result is computed eagerly -- never a wrong answer.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_GRAPHS = 64
WARM = "warm"  # cache marker: the signature ran once, eagerly; its next call captures
_side_streams: dict = {}  # device -> the stream that warm-ups and captures run on


@dataclass
class Captured:
    """One captured call: the graph, the static buffers it reads (q, k, v, key padding mask or None) and the
    results it writes on every replay."""

    graph: object  # torch.cuda.CUDAGraph
    inputs: tuple
    out: Tensor
    density: object  # a 0-dim tensor, or a Python number fixed by the signature
    keep: object = None  # made before the capture, read by the graph, cached elsewhere: see held()


class GraphCache:
    """A selector's graphs: signature -> ``WARM`` or :class:`Captured`, least recently used first; the memory pool
    per device; the static q, k and v buffers per layout (shared by the graphs of that layout)."""

    def __init__(self, limit: int = MAX_GRAPHS):
        self.limit = limit
        self.entries: OrderedDict = OrderedDict()
        self.pools: dict = {}
        self.buffers: dict = {}

    def get(self, key):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key, entry) -> None:
        self.entries[key] = entry
        self.entries.move_to_end(key)
        if len(self.entries) > self.limit:
            while len(self.entries) > self.limit:
                self.entries.popitem(last=False)  # the graph and its results go with the entry
            used = [e.inputs[0] for e in self.entries.values() if isinstance(e, Captured)]
            self.buffers = {k: b for k, b in self.buffers.items() if any(b[0] is q for q in used)}

    def captured(self) -> int:
        return sum(isinstance(e, Captured) for e in self.entries.values())

    def pool(self, device):
        if device not in self.pools:
            self.pools[device] = torch.cuda.graph_pool_handle()
        return self.pools[device]

    def static_inputs(self, inputs: tuple) -> tuple:
        """Buffers laid out like ``inputs`` (same shapes and strides), made outside any graph's pool; each replay
        sets their contents. q, k and v share buffers with the other graphs of their layout. The key padding mask
        gets a buffer of its own: ``ops.flex.cached_block_mask`` caches a BlockMask by the mask object, so graphs
        sharing a mask buffer would share the BlockMask that only the first of them rebuilds on replay."""
        key = layout(inputs[:3])
        if key not in self.buffers:
            self.buffers[key] = tuple(_like(t) for t in inputs[:3])
        mask = inputs[3]
        return (*self.buffers[key], None if mask is None else _like(mask))


def _like(t: Tensor) -> Tensor:
    # A normal tensor even under torch.inference_mode: replays outside inference mode write into it too.
    with torch.inference_mode(False):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


def cache_of(selector) -> GraphCache:
    cache = selector.__dict__.get("_graphs")
    return cache if cache is not None else selector.__dict__.setdefault("_graphs", GraphCache())


def applies(selector, q, k, v, key_padding_mask) -> bool:
    """Whether a call takes the graph path: CUDA tensors, keys up to ``graph_max_len``, not inside someone else's
    stream capture or torch.compile trace, and no autograd (a replayed graph records no backward)."""
    if not all(isinstance(t, Tensor) for t in (q, k, v)) or not q.is_cuda or k.dim() != 4:
        return False  # malformed inputs: the eager path reports them
    if key_padding_mask is not None and not isinstance(key_padding_mask, Tensor):
        return False
    if k.shape[2] > selector.graph_max_len or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    return not torch.cuda.is_current_stream_capturing()


def layout(inputs: tuple) -> tuple:
    """Shapes, strides, dtypes and device of ``(q, k, v, key_padding_mask or None)``."""
    return tuple(None if t is None else (tuple(t.shape), t.stride(), t.dtype, str(t.device)) for t in inputs)


def graph_key(inputs: tuple, *, scale, backend: str, layer_idx) -> tuple:
    """Everything a captured call depends on besides the input values. Strides are part of it so that the warm-up
    ran on the layout the capture sees (a layout change would recompile FlexAttention inside the capture)."""
    return layout(inputs) + (scale, backend, layer_idx)


def dense(t: Tensor) -> bool:
    """Whether ``t`` fills its memory exactly (contiguous up to a permutation of its dimensions)."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def attend(selector, q: Tensor, k: Tensor, v: Tensor, *, scale, key_padding_mask, backend: str, layer_idx):
    """``selector._attend(...)`` through the graph policy above."""
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(q.device)
    # Sliced inputs (keys from a preallocated cache) are copied to a packed layout, so that the static buffers hold
    # what the call reads and no more, and the warm-up ran on the same layout.
    inputs = tuple(t if t is None or dense(t) else t.contiguous() for t in (q, k, v, key_padding_mask))

    def run(q, k, v, key_padding_mask):
        return selector._attend(q, k, v, scale=scale, key_padding_mask=key_padding_mask, backend=backend,
                                layer_idx=layer_idx)

    cache = cache_of(selector)
    key = graph_key(inputs, scale=scale, backend=backend, layer_idx=layer_idx)
    entry = cache.get(key)
    if entry is None:
        result = warm_up(run, inputs)
        cache.put(key, WARM)
        return result
    if entry is WARM:
        try:
            entry = capture(run, inputs, cache)
            entry.keep = held(selector, entry.inputs, layer_idx)
        except Exception as error:  # a method that cannot be captured must still answer
            give_up(selector, error)
            return run(*inputs)
        cache.put(key, entry)
    return replay(entry, inputs)


def held(selector, static: tuple, layer_idx):
    """What a graph reads that was made before its capture and is cached where it may be dropped while the graph
    lives: a static selector's pattern (``Selector.pattern`` keeps a few per selector), which also keeps its
    BlockMask (``ops.flex``, cached while the pattern lives) and its density. Shape constants need nothing:
    ``sparsa._shapes`` pins the entries a capture reads."""
    if selector.static:
        return selector.pattern(static[0], static[1], layer_idx=layer_idx)  # a cache hit: the capture just used it
    return None


def side_stream(device) -> "torch.cuda.Stream":
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


def warm_up(run, inputs: tuple):
    """``run(*inputs)`` on the side stream that captures will use (lazy per-stream state, such as cuBLAS
    workspaces, is then set up outside the capture), ordered with the caller's stream both ways."""
    device = inputs[0].device
    caller = torch.cuda.current_stream(device)
    side = side_stream(device)
    side.wait_stream(caller)  # the inputs are ready
    with torch.cuda.device(device), torch.cuda.stream(side):
        out, density = run(*inputs)
    caller.wait_stream(side)  # the caller's next work sees the results
    # The allocator must not hand these blocks to other work while the other stream may still use them.
    for t in inputs:
        if t is not None:
            t.record_stream(side)
    for t in (out, density):
        if isinstance(t, Tensor):
            t.record_stream(caller)
    return out, density


def capture(run, inputs: tuple, cache: GraphCache) -> Captured:
    """Capture ``run`` reading the static buffers for this layout, into the selector's pool. Raises whatever the
    capture raised (a host sync inside the method, an unsupported operation)."""
    device = inputs[0].device
    static = cache.static_inputs(inputs)  # capture runs no kernel: replay() fills them before the graph runs
    graph = torch.cuda.CUDAGraph()
    side = side_stream(device)
    # The outer stream context puts the caller's stream back even when the capture fails: torch.cuda.graph's
    # exit skips that when ending the capture raises. torch.cuda.graph synchronizes the device before capturing.
    with torch.cuda.device(device), torch.cuda.stream(side):
        with torch.cuda.graph(graph, pool=cache.pool(device), stream=side):
            out, density = run(*static)
    return Captured(graph, static, out, density)


def replay(entry: Captured, inputs: tuple):
    """Copy the inputs into the graph's buffers, replay it (on the caller's stream) and return clones of its
    results (the next replay overwrites them)."""
    for buffer, value in zip(entry.inputs, inputs):
        if buffer is not None:
            buffer.copy_(value)
    entry.graph.replay()
    density = entry.density.clone() if isinstance(entry.density, Tensor) else entry.density
    return entry.out.clone(), density


def give_up(selector, error: Exception) -> None:
    """One warning, then the selector runs eagerly from now on; its graphs are dropped."""
    warnings.warn(f"sparsa: {selector.name}: CUDA graph capture of attend() failed ({type(error).__name__}: "
                  f"{str(error)[:200]}); running it eagerly from now on", stacklevel=4)
    selector.cuda_graph = False
    selector.__dict__.pop("_graphs", None)
