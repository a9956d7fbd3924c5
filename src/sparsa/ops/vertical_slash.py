"""Vertical and slash scores of probe queries: the estimation step of MInference and FlexPrefill.

``vertical_slash_scores(q_probe, k, q_pos, scale)`` returns, per (batch, query head), the column sums and the
diagonal sums of the probes' causal softmax attention over all keys:

- ``vertical[j] = sum_p softmax_p[j]``;
- ``slash[o] = sum_p softmax_p[q_pos[p] - o]`` (diagonal ``o``: keys ``o`` positions before the query).

Two implementations with the same contract: ``naive`` (plain PyTorch; materialises probes x keys, fine for
tens of probes) and ``triton`` (two passes over key tiles, nothing probes x keys in memory: pass 1 keeps
each probe's running max and sum, pass 2 writes column sums per tile and adds diagonal sums atomically).
The Triton kernel runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .._shapes import device_key, shape_constant


def vertical_slash_scores_naive(q_probe: Tensor, k: Tensor, q_pos: Tensor, scale: float,
                                key_padding_mask: Tensor | None = None,
                                slash_block: int = 1) -> tuple[Tensor, Tensor]:
    """Plain PyTorch. ``q_probe [B, Hq, P, D]``, ``k [B, Hkv, Lk, D]``, ``q_pos [P]`` absolute positions,
    ``key_padding_mask [B, Lk]`` (True = real key)."""
    b, hq, p, d = q_probe.shape
    hkv, lk = k.shape[1], k.shape[2]
    qg = q_probe.float().view(b, hkv, hq // hkv, p, d)
    logits = torch.einsum("bhgpd,bhkd->bhgpk", qg, k.float()) * scale
    k_idx = torch.arange(lk, device=k.device)
    hidden = k_idx[None, :] > q_pos[:, None]
    if key_padding_mask is not None:
        hidden = hidden | ~key_padding_mask[:, None, None, None, :]
    logits = logits.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num(0.0).flatten(1, 2)  # [B, Hq, P, Lk]; padding-only rows: 0
    vertical = probs.sum(-2)
    offset = (q_pos[:, None] - k_idx[None, :]).clamp(min=0)
    slash = torch.zeros(b, hq, lk, dtype=probs.dtype, device=k.device)
    slash.scatter_add_(-1, offset.flatten().expand(b, hq, -1), probs.flatten(-2))
    return vertical, pool_sum(slash, slash_block)


def pool_sum(x: Tensor, block: int) -> Tensor:
    """Sums over consecutive groups of ``block`` entries of the last dim: ``[..., L] -> [..., ceil(L / block)]``."""
    if block == 1:
        return x
    n = x.shape[-1]
    return torch.nn.functional.pad(x, (0, -n % block)).view(*x.shape[:-1], -1, block).sum(-1)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def vertical_slash_scores(q_probe: Tensor, k: Tensor, q_pos: Tensor, scale: float, backend: str = "auto",
                          key_padding_mask: Tensor | None = None,
                          slash_block: int = 1) -> tuple[Tensor, Tensor]:
    """Column and diagonal sums ``([B, Hq, Lk], [B, Hq, ceil(Lk / slash_block)])`` float32; with
    ``slash_block`` > 1 the diagonal sums come pooled in bands of that many diagonals (``o // slash_block``),
    which is all block-level selectors need and far cheaper on the GPU. ``backend``: auto | triton | naive.
    Padded keys (``key_padding_mask`` False) get no probability."""
    if not isinstance(slash_block, int) or slash_block < 1:
        raise ValueError(f"slash_block must be an int >= 1, got {slash_block!r}")
    if backend == "auto":
        backend = "triton" if q_probe.is_cuda and triton_available() else "naive"
    if backend == "naive":
        return vertical_slash_scores_naive(q_probe, k, q_pos, scale, key_padding_mask, slash_block)
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'naive', got {backend!r}")
    return _vertical_slash_triton(q_probe, k, q_pos, scale, key_padding_mask, slash_block)


PARTIALS_MAX_BYTES = 256 << 20  # per-probe-tile column sums beyond this: atomic adds instead


def _vertical_slash_triton(q_probe, k, q_pos, scale, key_padding_mask=None, slash_block=1, num_warps=8,
                           column_partials=None):
    """``num_warps`` of the column pass: 8 ran it 10% faster than 4 on the H200 at 32K and 128K, with 64 and 512
    probes (BENCHMARKS.md, session 8). ``column_partials``: column sums stored per probe tile and summed here,
    instead of atomic adds: deterministic, and 5-7% faster with 512 probes at 32K and 128K on the H200 (equal
    with 64 probes; BENCHMARKS.md, session 9). ``None`` uses them while the partial sums take at most
    ``PARTIALS_MAX_BYTES``; beyond that (large batches at long lengths) the atomic adds need no extra memory."""
    import triton

    from ._vertical_slash_kernels import column_pass, stats_pass

    b, hq, p, d = q_probe.shape
    hkv, lk = k.shape[1], k.shape[2]
    if os.environ.get("TRITON_INTERPRET") == "1" and q_probe.dtype == torch.bfloat16:
        # Triton's CPU interpreter computes bf16 dot products wrongly (NumPy has no bf16); fp32 there.
        q_probe, k = q_probe.float(), k.float()
    q_probe, k = q_probe.contiguous(), k.contiguous()
    q_pos = q_pos.to(device=k.device, dtype=torch.int32).contiguous()
    block_p = max(16, min(64, triton.next_power_of_2(p)))  # probe rows per tile (registers bound it)
    p_tiles = triton.cdiv(p, block_p)
    p_pad = p_tiles * block_p
    block_d = max(16, triton.next_power_of_2(d))
    block_n = 64
    # Key splits of TILES tiles each: enough programs to fill the GPU at every length, one compiled kernel.
    tiles = 16
    nsplit = triton.cdiv(lk, block_n * tiles)
    part_max = torch.empty(b * hq, p_pad, nsplit, dtype=torch.float32, device=k.device)
    part_sum = torch.empty_like(part_max)
    # Key padding as a per-key additive bias (0 or -inf), read with each key tile.
    if key_padding_mask is None:  # all zeros: made once per shape
        bias = shape_constant(("zeros", b, lk, device_key(k.device)),
                              lambda: torch.zeros(b, lk, dtype=torch.float32, device=k.device))
    else:
        bias = torch.zeros(b, lk, dtype=torch.float32, device=k.device)
        bias.masked_fill_(~key_padding_mask.to(k.device), float("-inf"))
    common = dict(D=d, HQ=hq, GROUP=hq // hkv, SCALE=scale * math.log2(math.e), BLOCK_P=block_p, BLOCK_D=block_d,
                  BLOCK_N=block_n)
    stats_pass[(b * hq, p_tiles, nsplit)](q_probe, k, q_pos, bias, part_max, part_sum, p, p_pad, lk, TILES=tiles,
                                          **common)
    row_max, row_sum = _merge_splits(part_max, part_sum)
    if column_partials is None:
        column_partials = p_tiles * b * hq * lk * 4 <= PARTIALS_MAX_BYTES
    partials = column_partials and p_tiles > 1  # one probe tile: each column is written once either way
    vertical = torch.zeros(p_tiles if partials else 1, b, hq, lk, dtype=torch.float32, device=k.device)
    slash_len = triton.cdiv(lk, slash_block)
    slash = torch.zeros(b, hq, slash_len, dtype=torch.float32, device=k.device)
    column_pass[(b * hq, p_tiles, nsplit)](q_probe, k, q_pos, bias, row_max, row_sum, vertical, slash, p, p_pad, lk,
                                           slash_len, TILES=tiles, SLASH_BLOCK=slash_block, COL_PARTIALS=partials,
                                           num_warps=num_warps, **common)
    return vertical.sum(0) if partials else vertical[0], slash


def _merge_splits(part_max: Tensor, part_sum: Tensor) -> tuple[Tensor, Tensor]:
    """Per probe, the softmax max and normaliser (log2 units) over all key splits: ``[..., S] -> [...]``."""
    row_max = part_max.amax(-1)
    safe = torch.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = (part_sum * torch.exp2(part_max - safe[..., None])).sum(-1)
    return row_max.contiguous(), row_sum.contiguous()
