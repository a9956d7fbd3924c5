"""Block-sparse attention in one Triton launch: the ``"triton"`` backend of ``block_sparse_attention``.

FlexAttention needs a ``BlockMask`` per pattern (a split of the tiles into partial and full lists, one more
launch, and Python bookkeeping) and a call through ``torch.compile``'s guards: about 0.6 ms of CPU time per
attention call on the H200's host (BENCHMARKS.md, session 7), which at 8K tokens is as long as the sparse
attention itself. This kernel reads the pattern's index lists as they are, so a call is one launch.

Forward only (inference): the backend is chosen automatically only when no input needs a gradient. Patterns with
a token-level mask (``token_mask``: the static sink / window / neighbourhood patterns) stay on FlexAttention,
whose mask functions this kernel does not evaluate. The plain-PyTorch ``block_sparse_attention_naive`` is the
reference, compared in CPU tests under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from ..pattern import BlockPattern

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _largest_tile(block: int, cap: int) -> int:
    """The largest power of two <= ``cap`` dividing ``block`` (0 when it is under 16, tl.dot's minimum)."""
    tile = cap
    while tile >= 16 and block % tile:
        tile //= 2
    return tile if tile >= 16 else 0


def config(pattern: BlockPattern, head_dim: int, value_dim: int, dtype: torch.dtype) -> dict | None:
    """Tile sizes and launch options for a pattern, or ``None`` when the kernel does not take it.

    Head dims up to 128 in 16-bit: tiles of 128 queries x 128 keys, 8 warps, 2 stages -- the fastest of six
    configurations timed on the H200 on five methods' patterns at 8K-128K (BENCHMARKS.md, session 8: 1.13-1.21x
    FlexAttention's kernel on the sparse patterns). Wider heads and float32 take 64 x 32 tiles to fit shared
    memory. A tile never spans two pattern blocks: it is the largest power of two dividing the block.
    """
    if dtype not in _DTYPES or pattern.token_mask is not None or max(head_dim, value_dim) > 256:
        return None
    wide = max(head_dim, value_dim) > 128 or dtype == torch.float32
    block_m = _largest_tile(pattern.block_q, 64 if wide else 128)
    block_n = _largest_tile(pattern.block_k, 32 if wide else 128)
    if not (block_m and block_n):
        return None
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m >= 128 else 4, num_stages=2)


def supports(pattern: BlockPattern, q: Tensor, v: Tensor) -> bool:
    return config(pattern, q.shape[-1], v.shape[-1], q.dtype) is not None


def block_sparse_attention_triton(q: Tensor, k: Tensor, v: Tensor, pattern: BlockPattern, *, causal: bool,
                                  scale: float, key_padding_mask: Tensor | None,
                                  options: dict | None = None) -> tuple[Tensor, Tensor]:
    """``(out [B, Hq, Lq, Dv], lse [B, Hq, Lq] float32)``; same contract as ``block_sparse_attention_naive``.

    ``options`` overrides the tile sizes and launch options of :func:`config` (for tuning)."""
    import triton  # noqa: F401  (a clear ImportError here, before the kernel module)

    from ._attention_kernels import sparse_attention_kernel

    batch, hq, lq, dim = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    cfg = config(pattern, dim, dv, q.dtype)
    if cfg is None:
        raise ValueError(f"the Triton attention kernel does not take this case (dtype {q.dtype}, head dims "
                         f"{dim}/{dv}, blocks {pattern.block_q}x{pattern.block_k}, token mask "
                         f"{pattern.token_mask is not None})")
    cfg.update(options or {})
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    num, idx = pattern.kv_num_blocks, pattern.kv_indices
    if num.device != q.device:
        num, idx = num.to(q.device), idx.to(q.device)
    if idx.stride(-1) != 1:
        idx = idx.contiguous()
    heads = pattern.heads
    ph_div = 1 if heads == hq else (hq // hkv if heads == hkv else hq)  # heads == 1: every head reads row 0
    s_nb = num.stride(0) if pattern.batch == batch else 0
    s_ib = idx.stride(0) if pattern.batch == batch else 0
    pad = key_padding_mask
    if pad is not None:
        pad = pad.to(device=q.device).view(torch.uint8)
    out = torch.empty(batch, hq, lq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, hq, lq, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(lq, cfg["BLOCK_M"]), batch * hq)
    sparse_attention_kernel[grid](
        q, k, v, out, lse, num, idx, pad if pad is not None else num,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        s_nb, num.stride(1), num.stride(2), s_ib, idx.stride(1), idx.stride(2),
        pad.stride(0) if pad is not None else 0,
        hq, hq // hkv, ph_div, lq, lk, lk - lq, float(scale) * math.log2(math.e),
        BQ=pattern.block_q, BK=pattern.block_k, D=dim, DV=dv, BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)), CAUSAL=bool(causal), HAS_PAD=pad is not None,
        IEEE=q.dtype == torch.float32, INTERPRET=_interpreted(), **cfg)
    return out, lse


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
