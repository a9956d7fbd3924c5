"""HiP attention: a coarse-to-fine tree search for each query block's top-k key blocks, O(N log N).

Lee et al., "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework With Hierarchically
Pruned Attention" (ICLR 2025; DeepAuto-AI/hip-attention). HiP assumes *attention locality*: keys next to each
other get similar scores, so a span of keys can be judged by one representative key. Per query block:

1. the searchable keys are split into ``k`` contiguous nodes;
2. every node is split in two; each child is scored (``scoring``, below) with the score reduced over the query
   block's queries by max; the ``k`` best children (over all children of the row) are kept;
3. step 2 repeats until the nodes are single blocks (``ceil(log2(n / k))`` levels, each costing
   ``O(k)`` key loads per query block: ``O(N log N)`` in all);
4. the ``k`` selected blocks, the sink block(s) and the local window blocks form the pattern.

Node scoring (``scoring``):

- ``"bound"`` (the default): the Quest upper bound of the child's keys (Tang et al., "Quest: Query-Aware Sparsity
  for Efficient Long-Context LLM Inference", ICML 2024), ``sum_d max(q_d kmax_d, q_d kmin_d)`` with ``kmax`` /
  ``kmin`` the elementwise max / min over *every* key of the child. Any key far above its neighbours (a "needle")
  raises the bound of every node holding it, wherever it sits in the node, where a single representative token
  only sees it if it happens to be that token (attention locality does not hold for needles). Measured on the
  reference model (ref-small, H200, 20 samples per cell, NIAH family and variable tracking at 8K-32K, same
  density: 0.18 at 8K, 0.05 at 32K; BENCHMARKS.md, session 4): variable tracking kept 96.5% of dense with
  ``"bound"`` against 67% (8K) with ``"centre"``, the NIAH tasks 98.2% against 97.7% (upper bounds, measured
  before the prompts ended with the answer's leading space; on the CPU with the fixed prompts, multi-key at 8K:
  0.7 with ``"bound"``, 1.0 with ``last_window`` below, 0.1 with ``"centre"``). The price is estimation time:
  3.8 ms against about 3 ms per call at 32K tokens (32/8 heads, D = 128). The max / min of any node ``[lo, hi)``
  of key blocks comes from a sparse table over the key blocks (level ``j`` holds the max over ``2^j`` consecutive
  blocks, ``[kmax, -kmin]`` side by side so one max serves both), built once per call with ``O(log Kb)`` tensor ops, as
  the max of two overlapping power-of-two windows: one gather per level of the search. The table has
  ``log2`` (largest child, in blocks) + 1 levels of ``[B, Hkv, Kb, 2 D]`` float32 (at 128K tokens, 8 KV heads,
  D = 128 and the defaults: 6 levels, 50 MB per sequence).
- ``"centre"``: the child's representative key is its centre token, as in the paper (scored by the plain dot
  product ``q . k``).

Defaults: ``sliding_window = 128`` (HiP v1.0), ``sink = 4`` tokens (the ``sink_token_size`` of the v1.1
``hip_attention`` entry point), and ``mask_k = 2048`` keys per query in ``block = 128`` tiles, where the paper's
v1.0 default is ``mask_k = 512`` (InfiniteHiP, v1.2, keeps 2048-4096 keys in its last pruning stage). Why: on
ref-small stage 6 (H200, the NIAH family and variable tracking at 8K-32K, 20 samples per cell, prompts ending with
the answer's leading space; BENCHMARKS.md, session 6) the paper's 512 kept 97.8% of dense (vt at 32K: 84%) at
density 0.047 at 32K, 1024 kept 98.8%, and 2048 kept 99.4% (vt at 32K: 93%) at 0.143; 2048 keys are still 6% of a
32K context and 1.6% of 128K. With 128-token tiles the whole call is 1.7x faster than with 64 at the same budget
at 32K and 128K (32K: 3.9 against 6.5 ms at ``mask_k = 512``; alike at 8K), since FlexAttention runs 64-token
sparse tiles at about half its dense efficiency; at the defaults hip runs at 4.3x SDPA flash at 32K and 16.9x at
128K. Granularity mapping onto sparsa's square tiles:

- HiP builds its mask for query blocks of ``b_q = 32`` queries over key groups of ``b_k = 1-2`` tokens;
  sparsa's kernels compute ``block x block`` tiles, so the tree search here stops at key *blocks*: ``mask_k``
  tokens become ``ceil(mask_k / block)`` selected blocks (16 at the defaults). A leaf block is still scored like
  every node above it (its centre token, or its keys' bound).
- ``block = 64`` is closer to HiP's 32-query blocks and 1-2 token leaves, but costs the kernel's efficiency
  (above); ``block=64, mask_k=512`` is the closest to the paper's configuration.
- ``sliding_window`` tokens become the diagonal block plus the ``ceil(sliding_window / block)`` blocks before
  it (a superset of every query's token window); ``sink`` tokens become the first ``ceil(sink / block)``
  blocks. Sinks and window are excluded from the search range (as HiP excludes the window), so the searched
  blocks come on top of them; with ``mask_k`` at least the key length the pattern is dense causal.
- ``last_window`` (default on): the block window leaves the last query of a full block ``ceil(sliding_window /
  block) * block + block - 1`` tokens back, but the last query of a short last block (a prompt whose length is
  not a multiple of ``block``) only about ``sliding_window``: the prompt's last token, the one whose output is the
  first generated token, had a context that depended on the length modulo ``block``. The last query block then
  gets one more window block. Measured on ref-small (CPU, niah_multikey at 8K, 10 samples): a layer-0 head puts
  0.97-0.99 of the last query's attention on the first token of the question line, 155-161 tokens back, in the
  block just before the window of a 1-4 token last block; the Quest bound of that block ranked 25th-62nd of 124
  (every 64-key block's bound there is about 2.5x its true max, all alike), so neither this tree search nor a
  flat bound top-k (``biformer`` at 16 blocks of 64) found it, and 3 of 10 answers (0.7) flipped to a
  distractor's value; with it 1.0 (``sparsa bench``, batch 4), niah_single unchanged at 1.0, density 0.17805 ->
  0.17817 (one block per layer, KV head and prompt).
- Query reduction: HiP takes the max over a query block's queries, which its code subsamples with a query
  stride (v1.2's scan stages: 64-query blocks at stride 4, i.e. 16 queries); here the max is over
  ``query_samples = 16`` evenly spaced queries of the block, always including its last query (the one that
  sees every searched block; query/key pairs that are not causally visible are masked out of the score).

GQA: one pattern per KV head; a group's query heads are reduced by max together with the block's queries
(they read the same keys, so their union of interest is what one KV head's blocks must serve). The keys are
gathered once per KV head, never repeated, and the pattern is a quarter (at 4 query heads per KV head) of a
per-query-head one.

Deviations: the search stops at blocks, not HiP's 1-2 token leaves, and the mask is block-granular; by default
a node is scored by its keys' Quest bound, not by the paper's centre token (``scoring="centre"`` restores it);
HiP's random/first-token sampling variants and SparQ low-rank scoring are not implemented; no HiP-specific dense
layers (``dense_below`` still applies). Estimation: with ``"bound"`` on CUDA, the sparse table and the whole
search are two Triton launches (:mod:`sparsa.ops.hip_search`: one program per sequence, KV head and query block,
every level in registers; ~80 small PyTorch ops before, whose launches cost more than the work at 8K tokens);
on the CPU, for more than 32 kept blocks or 256 sampled rows per query block, and as the fallback of a failing
kernel, the PyTorch search below (``_search_bound``, the reference). ``"centre"`` is plain PyTorch. Both PyTorch
searches are batched over batch, heads and query blocks; one level holds ``O(B * Lq/block * k * (Hq * samples +
Hkv * D))`` numbers (``"bound"``: a few times the ``Hkv * D`` term, the two windows of every child's ``2 D``
bounds).

Padding (``key_padding_mask [B, Lk]``, True = real token, e.g. left padding in a batch): a node is represented
by the centre of its real keys (the span from its first to its last real key; ``"bound"``: the bounds take only
its real keys), a node made only of padding is dead (never searched further, never picked), and padded sampled
queries do not score. The sink and window blocks stay forced even where they are padding (the kernel masks
padded keys); the pattern becomes one per sequence. Without padding every node keeps its centre token (or its
bound), so an unpadded sequence gets its unpadded pattern.

Causality: with a window block (``sliding_window > 0``) every searched key precedes every query of the block;
without one, ``"centre"`` masks the samples that do not see the centre token and ``"bound"`` those that do not
see the node's first key (the bound may then include a few keys that such a sample does not see).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._shapes import device_key, shape_constant
from ..ops import hip_search
from ..pattern import BlockPattern, last_visible_block
from ..registry import register
from .base import Selector, check_block, check_int, check_samples
from .estimate import sample_rows

SCORINGS = ("bound", "centre")


@register("prefill", "hip")
@dataclass
class HiP(Selector):
    #: keys per query selected by the tree search, in tokens (HiP's ``mask_k``); ``ceil(mask_k / block)`` blocks
    mask_k: int = 2048
    #: local window in tokens, always computed (with the diagonal block)
    sliding_window: int = 128
    #: attention-sink tokens at the start, always computed (key block 0 when ``sink <= block``)
    sink: int = 4
    block: int = 128
    # Dense SDPA below this key length, where torch's fastest SDPA (cuDNN) still wins. Estimation included (the
    # search in Triton), attention in sparsa's Triton kernel, against SDPA flash / cuDNN at the defaults: 1.3-2.0x /
    # 0.6-1.0x at 8K over six processes, 3.20x / 1.82x at 16K (session 7), 6.9x at 32K, 27x at 128K (eager;
    # BENCHMARKS.md, session 8).
    dense_below: int = 16384
    #: queries per query block whose max scores a node (evenly spaced, the block's last query included)
    query_samples: int = 16
    #: how a node is scored: ``"bound"``, the Quest upper bound of its keys, or ``"centre"``, its centre token (the
    #: paper's); see the module docstring
    scoring: str = "bound"
    #: one more window block for the last query block when the sequence's last query is not the last token of its
    #: key block (a length that is not a multiple of ``block``), so that this query, whose output predicts the first
    #: generated token, sees at least ``ceil(sliding_window / block) * block + block - 1`` tokens back, as the last
    #: query of every full block does; without it that query's window shrinks to ``sliding_window`` plus
    #: ``Lk mod block`` tokens or so. See the module docstring (window granularity) for why it matters
    last_window: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "mask_k")
        check_int(self, "sliding_window", minimum=0)
        check_int(self, "sink", minimum=0)
        check_block(self)
        check_samples(self)
        if not isinstance(self.last_window, bool):
            raise ValueError(f"{self.name}: last_window must be a bool, got {self.last_window!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"{self.name}: scoring must be one of {SCORINGS}, got {self.scoring!r}")

    @property
    def topk_blocks(self) -> int:
        return -(-self.mask_k // self.block)

    def select(self, q: Tensor, k: Tensor, *, layer_idx=None, key_padding_mask=None) -> BlockPattern:
        batch, hq, lq, dim = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        if hkv == 0 or hq % hkv:
            raise ValueError(f"{self.name}: query heads ({hq}) must be a multiple of key/value heads ({hkv})")
        if lq > lk:
            raise ValueError(f"{self.name}: q has more positions ({lq}) than k ({lk})")
        bs, dev = self.block, q.device
        win, n_sink = -(-self.sliding_window // bs), -(-self.sink // bs)
        nodes = self._layout("nodes", lq, lk, dev)
        nodes = nodes.expand(batch, hkv, *nodes.shape)

        # Levels: enough halvings to bring the largest initial node (of the last row, the longest range) to 1.
        topk = self.topk_blocks
        n_max = max(0, max((lk - 1) // bs - win, 0) - n_sink)
        levels = math.ceil(math.log2(-(-n_max // topk))) if n_max > topk else 0
        real = None if key_padding_mask is None else key_padding_mask.to(device=dev, dtype=torch.bool)
        if levels:
            nodes = self._search(q, k, nodes, levels, real, -(-n_max // topk))
        lo, hi = nodes.unbind(-1)
        picked = hi > lo  # single blocks (or empty pieces) by now
        if real is not None:  # a block made only of padding is never picked (dead nodes can fill a short top-k)
            kb = -(-lk // bs)
            block_real = torch.nn.functional.pad(real, (0, kb * bs - lk)).view(batch, 1, 1, kb, bs).any(-1)
            picked = picked & torch.gather(block_real.expand(*lo.shape[:3], kb), -1, lo.clamp(max=kb - 1))

        shape = (batch, hkv, -1, -1)
        idx = torch.cat((self._layout("forced", lq, lk, dev).expand(shape), lo), -1)
        ok = torch.cat((self._layout("forced_ok", lq, lk, dev).expand(shape), picked), -1)
        return BlockPattern.from_index_lists(idx, ok, q_len=lq, kv_len=lk, block=bs)

    def _search(self, q: Tensor, k: Tensor, nodes: Tensor, levels: int, real: Tensor | None,
                widest: int) -> Tensor:
        """The tree search from ``nodes [B, Hkv, Qb, k, 2]`` (block ranges ``[lo, hi)``, at most ``widest`` blocks
        each): ``levels`` times, halve every node and keep the k best children of each row. Returns the final
        nodes, single blocks or empty."""
        if self.scoring == "bound":  # two Triton launches on CUDA (sparsa.ops.hip_search), else _search_bound
            lq, lk = q.shape[2], k.shape[2]
            return hip_search.hip_search(
                q, k, self._layout("nodes", lq, lk, q.device), levels, block=self.block,
                samples=self.query_samples, widest=widest, causal=real is not None or self.sliding_window == 0,
                key_real=real, reference=lambda: self._search_bound(q, k, nodes, levels, real, widest))
        batch, hkv, qb, topk, _ = nodes.shape
        bs, dim = self.block, k.shape[3]
        q_rep, rows = self._query_samples(q, hkv)
        # With a window block before the diagonal, every searched key precedes every query of the block (the search
        # ends before block last - 1, which starts before the block's first query): no causal mask is needed.
        q_pos = None
        if real is not None or self.sliding_window == 0:
            q_pos = (rows + (k.shape[2] - q.shape[2]))[:, None, :, None]  # [Qb, 1, S, 1] against [.., Qb, 2k, S, G]
        if real is None:
            # A child [a, b) is scored by its centre token (a + b) * block / 2, a multiple of block / 2: only those
            # keys are ever read, so they are converted to float once (1/32 of K at block 64).
            half = bs // 2
            source = k[:, :, ::half].float()
        else:  # the centre of a child's real keys can be any token
            source = k
            spans = _real_spans(real, bs)
            q_pos = torch.where(real[:, q_pos], q_pos, -1)[:, None]  # padded queries see no key
        for _ in range(levels):
            children = _halve(nodes)  # [B, Hkv, Qb, 2k, 2]
            c_lo, c_hi = children.unbind(-1)
            if real is None:
                alive = c_hi > c_lo
                at = children.sum(-1)  # the centre token in units of block / 2 (in range for dead children too)
                centre = None if q_pos is None else at * half
            else:  # the centre of the child's real keys; a child made only of padding is dead
                centre, alive = _real_centre(c_lo, c_hi, *spans)
                centre = at = torch.where(alive, centre, 0)
            keys = torch.gather(source, 2, at.view(batch, hkv, -1, 1).expand(-1, -1, -1, dim))
            s = torch.matmul(keys.view(batch, hkv, qb, 2 * topk, dim).float(), q_rep.transpose(-1, -2))
            s = s.view(*alive.shape, self.query_samples, -1)  # [B, Hkv, Qb, 2k, S, G]
            if q_pos is not None:
                s = torch.where(q_pos >= centre[..., None, None], s, float("-inf"))
            s = torch.where(alive, s.amax((-2, -1)), float("-inf"))
            best = torch.topk(s, topk, dim=-1).indices
            nodes = torch.gather(children, -2, best[..., None].expand(-1, -1, -1, -1, 2))
        return nodes

    def _search_bound(self, q: Tensor, k: Tensor, nodes: Tensor, levels: int, real: Tensor | None,
                      widest: int) -> Tensor:
        """``_search`` scoring each child by the Quest bound of its (real) keys: ``relu(q) . kmax + relu(-q) .
        (-kmin)``, from the sparse table of ``[kmax, -kmin]`` (one gather per level) against the sampled queries
        ``[relu(q), relu(-q)]`` (float32).

        A node is carried as ``(lo, n)`` (first block, size): both children of a node, their first and last blocks
        and the flat-table rows of their two windows are ``lo`` plus offsets that depend on ``n`` only, so one
        look-up in ``_bound_layout``'s ``lut`` and one add give them (the first level's, from the shape-only
        initial nodes, are made once). Same scores and ties as halving ``[lo, hi)`` and :func:`node_bounds`."""
        batch, hkv, qb, topk, _ = nodes.shape
        two_k, lq, lk, dev = 2 * topk, q.shape[2], k.shape[2], q.device
        const = self._bound_layout(lq, lk, dev)
        q_pm = self._bound_queries(q, hkv, const["signs"])  # [B, Hkv, Qb, S * G, 2D]
        table = bound_table(k, self.block, real, -(-widest // 2))  # children are at most ceil(widest / 2) blocks
        width = table.shape[-1]
        # every (query block, child) row reads the table of its sequence and head: an expanded view, no copy
        windows = table.view(batch, hkv, 1, 1, -1, width).expand(batch, hkv, qb, two_k, -1, width)
        q_blk = None  # as in _search: with a window block every searched key precedes every sampled query
        if real is not None or self.sliding_window == 0:
            # a sample sees a child's first key (block lo) iff its position // block >= lo
            q_blk = const["q_blk"]  # [Qb, 1, S, 1]
        if real is not None:
            q_blk = torch.where(real[:, const["q_pos"]], q_blk, -1)[:, None]  # padded queries see no key
            kb = table.shape[3]
            # [B, Kb + 1] real blocks before each block: a leading block of padding makes the cumsum start at 0
            real_before = torch.nn.functional.pad(real, (self.block, kb * self.block - real.shape[1]))
            real_before = real_before.view(batch, kb + 1, self.block).any(-1).cumsum(-1)
            real_before = real_before.view(batch, 1, 1, 1, -1).expand(batch, hkv, qb, two_k, -1)
        children = const["children"].expand(batch, hkv, -1, -1, -1)  # [B, Hkv, Qb, 2k, 5]
        state = nodes
        for level in range(levels):
            # children: per child [window row, window row, lo, hi, n]
            if level:
                lo, n = state.unbind(-1)  # the previous level's kept children
                children = const["lut"][n]  # [B, Hkv, Qb, k, 2, 5]
                children[..., :4].add_(lo[..., None, None])
                children = children.view(batch, hkv, qb, two_k, 5)
            if real is not None:  # a child without a real key is dead
                count = torch.gather(real_before, 4, children[..., 2:4])
                alive = count[..., 1] > count[..., 0]
            else:
                alive = children[..., 4] > 0 if level else const["alive"]
            rows = children[..., :2, None].expand(batch, hkv, qb, two_k, 2, width)
            bounds = torch.gather(windows, 4, rows).amax(-2)  # [B, Hkv, Qb, 2k, 2D]
            s = torch.matmul(bounds, q_pm.transpose(-1, -2))
            s = s.view(batch, hkv, qb, two_k, self.query_samples, -1)  # [B, Hkv, Qb, 2k, S, G]
            if q_blk is not None:  # a sample scores the children whose first key it sees
                s = torch.where(q_blk >= children[..., 2, None, None], s, float("-inf"))
            s = torch.where(alive, s.amax((-2, -1)), float("-inf"))
            best = torch.topk(s, topk, dim=-1).indices[..., None].expand(-1, -1, -1, -1, 2)
            # the kept children: (lo, n) for the next level, (lo, hi) after the last
            state = torch.gather(children[..., 2:4] if level == levels - 1 else children[..., 2::2], 3, best)
        return state

    def _bound_queries(self, q: Tensor, hkv: int, signs: Tensor) -> Tensor:
        """``[B, Hkv, Qb, S * G, 2D]`` float32 ``[relu(q), relu(-q)]`` of the sampled queries, ordered as in
        ``_query_samples`` (``q * [1, -1]`` promotes to float32 exactly, then one clamp)."""
        batch, hq, lq, dim = q.shape
        rows = sample_rows(lq, self.block, self.query_samples, q.device)
        by_position = q.view(batch, hkv, hq // hkv, lq, dim).transpose(2, 3)  # [B, Hkv, Lq, G, D]
        rep = by_position.index_select(2, rows.flatten())
        if rep.dtype == torch.float64:
            rep = rep.float()
        q_pm = rep.view(batch, hkv, rows.shape[0], -1, 1, dim) * signs  # [B, Hkv, Qb, S * G, 2, D] float32
        return q_pm.clamp_(min=0).view(batch, hkv, rows.shape[0], -1, 2 * dim)

    def _bound_layout(self, lq: int, lk: int, device) -> dict[str, Tensor]:
        """Shape-only tensors of ``_search_bound``, made once per geometry and device (shared: read only):
        ``lut [widest + 1, 2, 5]``, per node size ``n``, its two children's ``[window row, window row, lo, hi, n]``
        (rows of the flat sparse table and block range, relative to the node's ``lo``, the size absolute);
        ``children [Qb, 2k, 5]`` and ``alive [Qb, 2k]``, those of the initial nodes' children; ``q_pos [Qb, 1, S,
        1]``, the sampled queries' key positions, and ``q_blk``, their key blocks; ``signs``, ``[[1], [-1]]``."""
        key = ("hip_bound", lq, lk, self.block, self.topk_blocks, self.sliding_window, self.sink, self.query_samples,
               self.last_window, device_key(device))
        return shape_constant(key, lambda: self._make_bound_layout(lq, lk, device))

    def _make_bound_layout(self, lq: int, lk: int, device) -> dict[str, Tensor]:
        bs, topk = self.block, self.topk_blocks
        win, n_sink = -(-self.sliding_window // bs), -(-self.sink // bs)
        n_max = max(0, max((lk - 1) // bs - win, 0) - n_sink)
        widest = -(-n_max // topk)
        kb = -(-lk // bs)
        offsets = _window_offsets(_table_levels(-(-widest // 2), kb), kb, "cpu").tolist()
        entries = []
        for n in range(widest + 1):
            half = n // 2
            entries.append([[lo + offsets[size][0], lo + size + offsets[size][1], lo, lo + size, size]
                            for lo, size in ((0, half), (half, n - half))])
        lut = torch.tensor(entries, dtype=torch.long, device=device)
        lo, hi = self._layout("nodes", lq, lk, device).unbind(-1)  # [Qb, k]
        children = lut[hi - lo]
        children[..., :4].add_(lo[..., None, None])
        children = children.view(len(lo), 2 * topk, 5)
        rows = sample_rows(lq, bs, self.query_samples, device)
        q_pos = (rows + (lk - lq))[:, None, :, None]
        return {"lut": lut, "children": children, "alive": children[..., 4] > 0, "q_pos": q_pos,
                "q_blk": torch.div(q_pos, bs, rounding_mode="floor"),
                "signs": torch.tensor([[1.0], [-1.0]], device=device)}

    def _query_samples(self, q: Tensor, hkv: int) -> tuple[Tensor, Tensor]:
        """``[B, Hkv, Qb, S * G, D]`` float32 sampled queries, sample-major (their scores are reduced over samples
        and heads together, so the order is free, and this one needs no copy per level), and their rows ``[Qb, S]``."""
        batch, hq, lq, dim = q.shape
        rows = sample_rows(lq, self.block, self.query_samples, q.device)
        by_position = q.view(batch, hkv, hq // hkv, lq, dim).transpose(2, 3)  # [B, Hkv, Lq, G, D]
        rep = by_position.index_select(2, rows.flatten()).float()
        return rep.view(batch, hkv, rows.shape[0], -1, dim), rows

    def _layout(self, name: str, lq: int, lk: int, device) -> Tensor:
        """One of ``_make_layout``'s shape-only tensors; the layout is made once per geometry and device (shared:
        read only)."""
        key = ("hip", lq, lk, self.block, self.topk_blocks, self.sliding_window, self.sink, self.last_window,
               device_key(device))
        return shape_constant(key, lambda: self._make_layout(lq, lk, device))[name]

    def _make_layout(self, lq: int, lk: int, device) -> dict[str, Tensor]:
        """Per query block: ``nodes [Qb, k, 2]``, the search range [sink blocks, local window) cut into k
        contiguous block ranges ``[lo, hi)`` (empty pieces when it is shorter); ``forced [Qb, F]``, the sink and
        local window blocks, and ``forced_ok``, which of them are computed."""
        bs, topk = self.block, self.topk_blocks
        win, n_sink = -(-self.sliding_window // bs), -(-self.sink // bs)
        last = last_visible_block(lq, lk, bs, bs, device)  # [Qb] the diagonal block of each query block
        extra = int(self.last_window and win > 0 and lk % bs != 0)  # the last query is not its key block's last
        wins = torch.full_like(last, win)
        wins[-1:] += extra
        local_lo = (last - wins).clamp(min=0)  # first local-window block
        hi0 = local_lo.clamp(min=n_sink)  # search range [n_sink, hi0), empty if none
        cuts = n_sink + ((hi0 - n_sink)[:, None] * torch.arange(topk + 1, device=device)) // topk  # [Qb, k+1]
        sink = torch.arange(n_sink, device=device).expand(len(last), n_sink)
        local = local_lo[:, None] + torch.arange(win + 1 + extra, device=device)
        return {"nodes": torch.stack((cuts[:, :-1], cuts[:, 1:]), -1),
                "forced": torch.cat((sink, local), -1),
                "forced_ok": torch.cat((sink < local_lo[:, None], local <= last[:, None]), -1)}


def _halve(nodes: Tensor) -> Tensor:
    """``[..., k, 2]`` block ranges ``[lo, hi)`` -> their halves ``[..., 2k, 2]``, ``[lo, mid)`` then ``[mid, hi)``."""
    mid = nodes.sum(-1, keepdim=True) // 2
    return torch.cat((nodes[..., :1], mid, mid, nodes[..., 1:]), -1).view(*nodes.shape[:-2], -1, 2)


def _real_spans(real: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """``real [B, L]`` bool: per position, the first real position at or after it (``L`` if none), ``[B, L]``; per
    key block ``b``, that of its first token (``starts``) and one past the last real position before it (``stops``,
    0 if none), ``[B, >= ceil(L / block)]`` each: a block range's real keys are then two look-ups away."""
    length = real.shape[-1]
    pos = torch.arange(length, device=real.device)
    next_real = torch.where(real, pos, length).flip(-1).cummin(-1).values.flip(-1)
    stop = torch.where(real, pos + 1, 0).cummax(-1).values  # one past the last real position at or before each
    return next_real, next_real[:, ::block], torch.nn.functional.pad(stop[:, block - 1::block], (1, 0))


def _real_centre(lo: Tensor, hi: Tensor, next_real: Tensor, starts: Tensor, stops: Tensor) -> tuple[Tensor, Tensor]:
    """Representative key of block ranges ``[lo, hi)`` (``[B, ...]``): the centre of the range's real keys (the
    first to the last real key; the next real key when the centre is a padded hole), and whether the range holds a
    real key (never when it is empty). Without padding it is the range's centre token, ``(lo + hi) * block // 2``.
    The centre of a range without real keys may be ``L``: mask it before use."""
    flat = lambda t: t.reshape(len(next_real), -1)  # noqa: E731
    first = torch.gather(starts, 1, flat(lo)).view_as(lo)
    stop = torch.gather(stops, 1, flat(hi)).view_as(hi)
    centre = torch.gather(next_real, 1, flat((first + stop) // 2)).view_as(lo)
    return centre, first < stop


def bound_table(k: Tensor, block: int, real: Tensor | None, widest: int) -> Tensor:
    """Sparse table of the key blocks' Quest bounds: ``[B, H, J, Kb, 2D]`` float32, level ``j`` at block ``i``
    holding ``[max, -min]`` (elementwise) over the keys of blocks ``i .. i + 2^j - 1``, for the ``J`` levels that
    ranges of up to ``widest`` blocks need. Built with one op per level; the entries of level ``j`` past
    ``Kb - 2^j`` (windows running off the end) are left unset and never read. ``real [B, L]``: padded keys take no
    part; a window of padding only holds ``-inf`` (its nodes' scores may be NaN: callers mask such nodes)."""
    batch, heads, length, dim = k.shape
    kb = -(-length // block)
    tail = kb * block - length

    def blocks(fill: float) -> Tensor:  # [B, H, Kb, block, D]: padded keys and the short last block's tail = fill
        x = k if real is None else torch.where(real[:, None, :, None], k, fill)
        if tail:  # the neutral element of the reduction, so the short last block is exact
            x = torch.nn.functional.pad(x, (0, 0, 0, tail), value=fill)
        return x.reshape(batch, heads, kb, block, dim)

    levels = _table_levels(widest, kb)
    table = torch.empty(batch, heads, levels, kb, 2 * dim, dtype=torch.float32, device=k.device)
    base = table[:, :, 0]
    # reduced in k's dtype (exact), converted to float32 on the way into the table; one masked copy of k at a time
    base[..., :dim].copy_(blocks(float("-inf")).amax(3))
    neg_one = shape_constant(("hip_neg_one", device_key(k.device)), lambda: torch.tensor([-1.0], device=k.device))
    torch.mul(blocks(float("inf")).amin(3), neg_one, out=base[..., dim:])
    for j in range(1, levels):
        half, valid = 1 << (j - 1), kb - (1 << j) + 1
        torch.maximum(table[:, :, j - 1, :valid], table[:, :, j - 1, half:half + valid], out=table[:, :, j, :valid])
    return table


def _table_levels(widest: int, kb: int) -> int:
    """Levels of :func:`bound_table` for ranges of up to ``widest`` blocks: ``2^(J-1) <= widest < 2^J``."""
    return max(1, min(widest, kb)).bit_length()


def node_bounds(table: Tensor, nodes: Tensor) -> Tensor:
    """``[max, -min]`` over the keys of block ranges ``nodes [B, H, ..., 2]`` (``[lo, hi)``, at most ``2^J - 1``
    blocks, ``lo < Kb``) from :func:`bound_table`: the max of its two overlapping windows of
    ``2^floor(log2(hi - lo))`` blocks, one gather. ``[B, H, ..., 2D]``; an empty range gets the bounds of block
    ``lo`` (mask it)."""
    batch, heads, levels, kb, width = table.shape
    lut = shape_constant(("hip_bound_windows", levels, kb, device_key(table.device)),
                         lambda: _window_offsets(levels, kb, table.device))
    at = lut[nodes[..., 1] - nodes[..., 0]] + nodes  # [B, H, ..., 2] rows of the flat table
    flat = table.view(batch, heads, levels * kb, width)
    windows = torch.gather(flat, 2, at.view(batch, heads, -1, 1).expand(-1, -1, -1, width))
    return windows.view(*at.shape, width).amax(-2)


def _window_offsets(levels: int, kb: int, device) -> Tensor:
    """``[2^J, 2]``: per range size ``n``, the flat-table offsets of its first window (added to ``lo``) and its
    last (added to ``hi``): ``level * Kb`` and ``level * Kb - 2^level``, ``level = floor(log2 n)``; an empty
    range (``n = 0``) reads block ``lo`` twice."""
    level = torch.tensor([max(n.bit_length() - 1, 0) for n in range(1 << levels)])
    out = torch.stack((level * kb, level * kb - (1 << level)), -1)
    out[0] = 0
    return out.to(device)
