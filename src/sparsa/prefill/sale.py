"""SALE: tiles kept when a 4-bit estimate of their attention passes a per-head relative threshold.

Zhao et al., "SALE: Low-bit Estimation for Efficient Sparse Attention in Long-context LLM Prefilling" (2025),
BirdChristopher/SALE. Per head:

1. smoothing: subtract the sequence mean from q and k, quantise both to symmetric int4 (q per token, k per
   key block); the estimated logit adds the exact rank-1 mean terms back, so it approximates q.k itself;
2. exact pass over the sink block (key block 0) and the local window: each query's row max ``m_i`` and sum
   ``l_i`` over those keys;
3. a tile is computed when, for some query ``i`` and key ``j`` in it, the estimated relative attention
   ``exp(s~_ij - m_i) / l_i`` reaches the head's threshold ``theta_h`` (``theta_h = 0``: a dense head);
   sink, local window and diagonal tiles are always computed.

Defaults from the official code: threshold 0.008 before calibration, local window 128 tokens, 64-query blocks
(the paper's keys come in blocks of 32; sparsa uses square 64-token tiles). ``threshold`` is one value, one
per head, or one list per layer; ``calibrate`` (sparsa.prefill.sale.calibrate_thresholds) sets them per head
on the project's tasks.

The estimation pass (``sparsa.ops.sale_estimate``) runs as a Triton kernel on CUDA (the 4-bit integers held
in fp16 for the tensor cores: exact) beside a plain-PyTorch reference; the official int4 kernel exists for Ada
GPUs only. Its work is quadratic, as in the paper (which reports about 11% of dense attention with int4 on
Ada). On the H200 it was not a speed-up: the estimate alone took 1.9x the dense attention time at 128K, almost
all of it the passing-tiles kernel (BENCHMARKS.md, session 3). That kernel has since been rewritten (pipelined
K loads, K tiles shared by a KV head's query heads, a two-op epilogue; not yet timed on the GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._shapes import device_key, shape_constant
from ..pattern import BlockPattern
from ..ops.sale_estimate import passing_tiles
from ..registry import register
from .base import Selector, check_block, check_int
from .estimate import group_queries

@register("prefill", "sale")
@dataclass
class SALE(Selector):
    threshold: float | list = 0.008
    local_window: int = 128
    block: int = 64
    bits: int = 4

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.threshold, str):  # a calibration file written by `sparsa calibrate sale`
            self.threshold = _load_thresholds(self.threshold)
        check_int(self, "local_window", minimum=0)
        check_block(self)
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"sale: bits must be one of (2, 3, 4, 8), got {self.bits!r}")
        flat = self.threshold if isinstance(self.threshold, (list, tuple)) else [self.threshold]
        flat = [x for row in flat for x in (row if isinstance(row, (list, tuple)) else [row])]
        if not flat or any(not isinstance(x, (int, float)) or not 0.0 <= x < 1.0 for x in flat):
            raise ValueError(f"sale: threshold must be a value in [0, 1), one per head, or one list per layer; "
                             f"got {self.threshold!r}")

    def thresholds(self, heads: int, layer_idx: int | None, device) -> Tensor:
        """Per-query-head thresholds ``[Hq]`` for a layer."""
        return torch.tensor(self._per_head(heads, layer_idx), dtype=torch.float32, device=device)

    def _per_head(self, heads: int, layer_idx: int | None) -> tuple[float, ...]:
        t = self.threshold
        if isinstance(t, (list, tuple)) and t and isinstance(t[0], (list, tuple)):
            if layer_idx is None or layer_idx >= len(t):
                raise ValueError(f"sale: thresholds given for {len(t)} layers; none for layer {layer_idx}")
            t = t[layer_idx]
        t = [float(x) for x in (t if isinstance(t, (list, tuple)) else [t])]
        if heads % len(t):
            raise ValueError(f"sale: {len(t)} thresholds do not divide {heads} query heads")
        return tuple(x for x in t for _ in range(heads // len(t)))  # one per KV head: shared by its group

    def _log_thresholds(self, heads: int, layer_idx: int | None, device) -> Tensor:
        """``log(theta_h)`` per query head, ``-inf`` for a dense head (theta 0). Cached by value: building it on
        every call would be a blocking host-to-device copy on CUDA."""
        values = self._per_head(heads, layer_idx)
        logs = [math.log(max(x, 1e-30)) if x > 0 else -math.inf for x in values]
        return shape_constant(("sale_log_threshold", values, device_key(device)),
                              lambda: torch.tensor(logs, dtype=torch.float32, device=device))

    def select(self, q: Tensor, k: Tensor, *, layer_idx=None, key_padding_mask=None) -> BlockPattern:
        lq, lk, bs = q.shape[2], k.shape[2], self.block
        scale = 1.0 / math.sqrt(q.shape[-1])
        q, k = q.float(), k.float()
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(q.device)
        est = _estimate_inputs(q, k, bs, self.bits)
        if key_padding_mask is not None:  # padded keys never pass: their column term is -inf
            est = (*est[:5], est[5].masked_fill(~key_padding_mask[:, None, :], float("-inf")))
        # log(theta * l) + m = log(theta) + logsumexp: the estimated logit a key needs to reach theta of the
        # anchor softmax. -inf, so every tile passes, for a head with theta 0 or a query whose anchors are all
        # padding (logsumexp -inf).
        need = _anchor_logsumexp(q, k, scale, bs, self.local_window, key_padding_mask)
        need = need + self._log_thresholds(q.shape[1], layer_idx, q.device)[:, None]
        # passing_tiles counts no key after its query, so its tiles are causal already.
        tiles = passing_tiles(*est, need, scale, bs) | _anchor_tiles(lq, lk, bs, self.local_window, q.device)
        return BlockPattern.from_block_mask(tiles, q_len=lq, kv_len=lk, block_q=bs)


def quantize(x: Tensor, groups: int, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric integer quantisation over groups of ``groups`` rows along dim -2 (1: per token).

    Returns int8 values ``[..., L, D]`` and one float scale per group ``[..., ceil(L / groups)]``.
    """
    levels = 2 ** (bits - 1) - 1
    length = x.shape[-2]
    if length % groups:  # F.pad copies even when there is nothing to pad
        x = torch.nn.functional.pad(x, (0, 0, 0, -length % groups))
    xp = x.view(*x.shape[:-2], -1, groups, x.shape[-1])
    # max |x| as one reduction: xp.abs() would write a copy of x first
    step = torch.linalg.vector_norm(xp, math.inf, dim=(-1, -2)).clamp(min=1e-8) / levels
    ints = (xp / step[..., None, None]).round_().clamp_(-levels, levels).to(torch.int8)
    return ints.view(*x.shape[:-2], -1, x.shape[-1])[..., :length, :], step


def _estimate_inputs(q: Tensor, k: Tensor, block: int, bits: int):
    """Inputs of the estimated logit ``s~_ij = Q(q~_i).Q(k~_j) + q~_i.k_mean + q_mean.k_j`` (~= q_i.k_j).

    Smoothing (subtracting the means) shrinks the range the integers must cover; the mean terms are exact.
    """
    hkv = k.shape[1]
    q_mean, k_mean = q.mean(-2, keepdim=True), k.mean(-2, keepdim=True)
    q_s, k_s = q - q_mean, k - k_mean
    q_int, q_scale = quantize(q_s, 1, bits)  # scale [B, Hq, Lq]
    k_int, k_scale = quantize(k_s, block, bits)  # scale [B, Hkv, Kb]
    row_term = (group_queries(q_s, hkv) @ k_mean[:, :, None].transpose(-1, -2)).flatten(1, 2)[..., 0]  # [B, Hq, Lq]
    # [G, D] @ [D, Lk] per KV head: broadcasting k over the group would copy it G times
    col_term = (group_queries(q_mean, hkv)[..., 0, :] @ k.transpose(-1, -2)).flatten(1, 2)  # [B, Hq, Lk]
    return q_int, q_scale, k_int, k_scale, row_term, col_term


def _anchor_logsumexp(q: Tensor, k: Tensor, scale: float, block: int, window: int,
                      key_padding_mask: Tensor | None = None) -> Tensor:
    """``log(l_i) + m_i`` (SALE's row sum and max) over the sink block and the local window, exact:
    ``[B, Hq, Lq]``. Padded keys are left out; a query with no real anchor gets -inf.

    Each query block scores the keys its rows may need (sink block and window span) with one batched matmul,
    then masks each row to its own anchors: memory O(Lq * (sink + block + window)) per head, no per-query
    copy of its window's keys."""
    b, hq, lq = q.shape[:3]
    hkv, lk = k.shape[1], k.shape[2]
    keys, rows, outside = _anchor_layout(lq, lk, block, window, q.device)
    # Rows ordered (query, head of the group), so a query block is one [block * G, D] matrix per KV head.
    qb = group_queries(q, hkv).transpose(2, 3)[:, :, rows]  # [B, Hkv, Qb, block, G, D]
    scores = qb.mul_(scale).flatten(3, 4) @ k[:, :, keys].transpose(-1, -2)  # [B, Hkv, Qb, block * G, C]
    scores = scores.view(*qb.shape[:-1], -1).masked_fill_(outside, -math.inf)
    if key_padding_mask is not None:
        scores.masked_fill_(~key_padding_mask[:, keys][:, None, :, None, None], -math.inf)  # [B, 1, Qb, 1, 1, C]
    lse = torch.logsumexp(scores, -1)  # [B, Hkv, Qb, block, G]
    return lse.permute(0, 1, 4, 2, 3).reshape(b, hq, -1)[..., :lq]


def _anchor_layout(lq: int, lk: int, block: int, window: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Shape-only, so cached. Per query block: the keys it scores ``[Qb, C]`` (sink block, then the span its
    windows cover, clamped into range), its query rows ``[Qb, block]`` (the last block's overhang repeats the
    last row and is cut off afterwards) and which (row, key) pairs are no anchor ``[Qb, block, 1, C]``."""
    def make():
        n, sink, span = -(-lq // block), min(block, lk), max(window, 1)
        rows = torch.arange(n, device=device)[:, None] * block + torch.arange(block, device=device)  # [Qb, block]
        pos = rows + (lk - lq)  # query positions
        span_keys = pos[:, :1] - span + 1 + torch.arange(block + span - 1, device=device)
        keys = torch.cat([torch.arange(sink, device=device).expand(n, -1), span_keys], 1)  # [Qb, C]
        key, pos = keys[:, None, :], pos[:, :, None]
        in_sink = torch.arange(keys.shape[1], device=device) < sink
        # Window keys inside the sink block are already counted there: each key once.
        anchor = (key <= pos) & (in_sink | ((key > pos - span) & (key >= sink)))
        return keys.clamp(0, lk - 1), rows.clamp(max=lq - 1), ~anchor[:, :, None]

    return shape_constant(("sale_anchor_layout", lq, lk, block, window, device_key(device)), make)


def _anchor_tiles(lq: int, lk: int, block: int, window: int, device) -> Tensor:
    """Sink block and the tiles the local window reaches, the diagonal tile included: no row is empty.
    Shape-only, so cached."""
    def make():
        r = torch.arange(-(-lq // block), device=device)
        last = torch.clamp(r * block + block, max=lq) - 1 + (lk - lq)
        lo = (r * block + (lk - lq) - window + 1).clamp(min=0) // block
        c = torch.arange(-(-lk // block), device=device)
        return ((c[None, :] >= lo[:, None]) & (c[None, :] <= (last // block)[:, None])) | (c[None, :] == 0)

    return shape_constant(("sale_anchor_tiles", lq, lk, block, window, device_key(device)), make)


def _load_thresholds(path: str):
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"sale: threshold must be a number, a list, or a calibration file; {path!r} is no file")
    data = json.loads(file.read_text())
    return data["threshold"] if isinstance(data, dict) else data


@torch.no_grad()
def calibrate_thresholds(model, input_ids: Tensor, *, eps: float = 0.4, start: float = 0.008, floor: float = 1e-4,
                         local_window: int = 128, block: int = 64, bits: int = 4, backend: str = "auto") -> list:
    """Per-layer, per-query-head thresholds, SALE's calibration: for each head start at ``start`` and halve
    while the sparse output's summed absolute error against dense reaches ``eps * q_len``; at or below
    ``floor`` the head becomes dense (0). ``input_ids``: calibration prompts (the project uses its own
    retrieval tasks, as SALE uses KV-retrieval prompts). Pass the result as ``threshold=``.
    """
    from ..heads import capture_qkv
    from ..ops import block_sparse_attention

    captured = capture_qkv(model, input_ids)
    thresholds = []
    for layer in sorted(captured):
        q, k, v = captured[layer]
        dense = block_sparse_attention(q, k, v, None, backend=backend).float()
        theta = torch.full((q.shape[1],), float(start))
        while True:
            sel = SALE(threshold=theta.tolist(), local_window=local_window, block=block, bits=bits)
            out = block_sparse_attention(q, k, v, sel.select(q, k), backend=backend, validate=False).float()
            err = (out - dense).abs().sum((-1, -2)).mean(0).cpu()  # [Hq], summed over queries and dims
            bad = (err >= eps * q.shape[2]) & (theta > 0)
            if not bool(bad.any()):
                break
            theta[bad] /= 2
            theta[theta <= floor] = 0.0
        thresholds.append([round(float(t), 8) for t in theta])
    return thresholds
