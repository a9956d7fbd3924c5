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
Ada). On the H200 it is not a speed-up: the estimate alone took 2.3x the dense attention time at 128K
(BENCHMARKS.md, 2026-11-29), so sparsa's SALE is for accuracy studies until the kernel is reworked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..pattern import BlockPattern, causal_block_mask
from ..registry import register
from .base import Selector, check_block, check_int
from ..ops.sale_estimate import passing_tiles
from .estimate import force_sink_and_diagonal, group_queries

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
        t = self.threshold
        if isinstance(t, (list, tuple)) and t and isinstance(t[0], (list, tuple)):
            if layer_idx is None or layer_idx >= len(t):
                raise ValueError(f"sale: thresholds given for {len(t)} layers; none for layer {layer_idx}")
            t = t[layer_idx]
        t = torch.as_tensor(t, dtype=torch.float32, device=device).flatten()
        if t.numel() == 1:
            return t.expand(heads)
        if heads % t.numel():
            raise ValueError(f"sale: {t.numel()} thresholds do not divide {heads} query heads")
        return t.repeat_interleave(heads // t.numel())  # one per KV head: shared by its group

    def select(self, q: Tensor, k: Tensor, *, layer_idx=None, key_padding_mask=None) -> BlockPattern:
        lq, lk, bs = q.shape[2], k.shape[2], self.block
        scale = 1.0 / math.sqrt(q.shape[-1])
        theta = self.thresholds(q.shape[1], layer_idx, q.device)
        est = _estimate_inputs(q.float(), k.float(), bs, self.bits)
        m, l = _anchor_stats(q.float(), k.float(), scale, bs, self.local_window, key_padding_mask)  # [B, Hq, Lq]
        if key_padding_mask is not None:  # padded keys never pass: their column term is -inf
            est = (*est[:5], est[5].masked_fill(~key_padding_mask[:, None, :].to(q.device), float("-inf")))
        # log(theta * l) + m: the estimated logit a key needs to reach theta of the anchor softmax. A head with
        # theta 0, or a query whose anchors are all padding, passes every tile.
        need = m + torch.log(l) + torch.log(theta.clamp(min=1e-30))[None, :, None]
        dense_rows = (theta[None, :, None] <= 0) | (l <= 0)
        need = torch.where(dense_rows, torch.full_like(need, float("-inf")), need)
        tiles = passing_tiles(*est, need, scale, bs) & causal_block_mask(lq, lk, bs, bs, q.device)
        tiles |= _anchor_tiles(lq, lk, bs, self.local_window, q.device)
        tiles = force_sink_and_diagonal(tiles, lq, lk, bs, bs)
        return BlockPattern.from_block_mask(tiles, q_len=lq, kv_len=lk, block_q=bs)


def quantize(x: Tensor, groups: int, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric integer quantisation over groups of ``groups`` rows along dim -2 (1: per token).

    Returns int8 values ``[..., L, D]`` and one float scale per group ``[..., ceil(L / groups)]``.
    """
    levels = 2 ** (bits - 1) - 1
    length = x.shape[-2]
    xp = torch.nn.functional.pad(x, (0, 0, 0, -length % groups)).view(*x.shape[:-2], -1, groups, x.shape[-1])
    step = xp.abs().amax((-1, -2)).clamp(min=1e-8) / levels
    ints = torch.round(xp / step[..., None, None]).clamp(-levels, levels).to(torch.int8)
    return ints.view(*x.shape[:-2], -1, x.shape[-1])[..., :length, :], step


def _estimate_inputs(q: Tensor, k: Tensor, block: int, bits: int):
    """Inputs of the estimated logit ``s~_ij = Q(q~_i).Q(k~_j) + q~_i.k_mean + q_mean.k_j`` (~= q_i.k_j).

    Smoothing (subtracting the means) shrinks the range the integers must cover; the mean terms are exact.
    """
    hkv = k.shape[1]
    group = q.shape[1] // hkv
    q_mean, k_mean = q.mean(-2, keepdim=True), k.mean(-2, keepdim=True)
    q_s, k_s = q - q_mean, k - k_mean
    q_int, q_scale = quantize(q_s, 1, bits)  # scale [B, Hq, Lq]
    k_int, k_scale = quantize(k_s, block, bits)  # scale [B, Hkv, Kb]
    row_term = (q_s * k_mean.repeat_interleave(group, 1)).sum(-1)  # [B, Hq, Lq]
    col_term = (group_queries(q_mean, hkv) @ k.transpose(-1, -2)[:, :, None]).flatten(1, 3)  # [B, Hq, Lk]
    return q_int, q_scale, k_int, k_scale, row_term, col_term


def _anchor_stats(q: Tensor, k: Tensor, scale: float, block: int, window: int, key_padding_mask=None):
    """Row max and sum of exp over the sink block and the local window, exact: ``[B, Hq, Lq]`` each.
    Padded keys are left out; a query with no real anchor gets max -inf and sum 0."""
    lq, lk, hkv = q.shape[2], k.shape[2], k.shape[1]
    q_pos = torch.arange(lq, device=q.device) + (lk - lq)
    sink = k[:, :, : min(block, lk)]
    span = max(window, 1)
    idx = (q_pos[:, None] - torch.arange(span, device=q.device)[None, :])  # [Lq, W] recent keys
    ok = idx >= 0
    local = k[:, :, idx.clamp(min=0).flatten()].view(*k.shape[:2], lq, span, -1)  # [B, Hkv, Lq, W, D]
    qg = group_queries(q, hkv)  # [B, Hkv, G, Lq, D]
    s_sink = torch.einsum("bhgqd,bhkd->bhgqk", qg, sink) * scale
    s_sink = s_sink.masked_fill(torch.arange(sink.shape[2], device=q.device)[None, :] > q_pos[:, None], -math.inf)
    s_local = torch.einsum("bhgqd,bhqwd->bhgqw", qg, local) * scale
    # Keys in the sink block are already counted; drop them from the window to count each key once.
    s_local = s_local.masked_fill(~ok | (idx < sink.shape[2]), -math.inf)
    if key_padding_mask is not None:
        pad = key_padding_mask.to(q.device)
        s_sink = s_sink.masked_fill(~pad[:, None, None, None, : sink.shape[2]], -math.inf)
        local_ok = pad[:, idx.clamp(min=0)]  # [B, Lq, W]
        s_local = s_local.masked_fill(~local_ok[:, None, None], -math.inf)
    scores = torch.cat([s_sink, s_local], -1)
    m = scores.amax(-1)
    l = torch.exp(scores - torch.where(torch.isfinite(m), m, 0.0)[..., None]).sum(-1)
    return m.flatten(1, 2), l.flatten(1, 2)


def _anchor_tiles(lq: int, lk: int, block: int, window: int, device) -> Tensor:
    """Sink block and the tiles the local window reaches."""
    last = torch.clamp(torch.arange(-(-lq // block), device=device) * block + block, max=lq) - 1 + (lk - lq)
    first_q = torch.arange(-(-lq // block), device=device) * block + (lk - lq)
    lo = (first_q - window + 1).clamp(min=0) // block
    c = torch.arange(-(-lk // block), device=device)
    return ((c[None, :] >= lo[:, None]) & (c[None, :] <= (last // block)[:, None])) | (c[None, :] == 0)


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
