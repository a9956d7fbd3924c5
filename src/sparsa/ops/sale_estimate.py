"""SALE's estimation pass: which tiles hold a quantised logit that reaches a per-query threshold.

``passing_tiles(q_int, q_scale, k_int, k_scale, row_term, col_term, need, scale, block)`` returns
``[B, Hq, Qb, Kb]`` bool: tile ``(r, c)`` passes when some query ``i`` in block ``r`` and visible key ``j`` in
block ``c`` have

    scale * (q_int_i . k_int_j * q_scale_i * k_scale_c + row_term_i + col_term_j) >= need_i

(queries are the last ``Lq`` of the ``Lk`` positions; keys after a query never count).

``naive``: plain PyTorch over chunks of query rows (linear memory, quadratic work). ``triton``: one program
per (head, query block) walking the visible key blocks with tensor-core dot products of the integer values (exact in fp16), nothing larger
than a tile in memory; on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .vertical_slash import triton_available

_CHUNK = 1 << 24


def passing_tiles(q_int, q_scale, k_int, k_scale, row_term, col_term, need, scale: float, block: int,
                  backend: str = "auto") -> Tensor:
    if backend == "auto":
        backend = "triton" if q_int.is_cuda and triton_available() else "naive"
    if backend == "naive":
        return passing_tiles_naive(q_int, q_scale, k_int, k_scale, row_term, col_term, need, scale, block)
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'naive', got {backend!r}")
    return _passing_tiles_triton(q_int, q_scale, k_int, k_scale, row_term, col_term, need, scale, block)


def passing_tiles_naive(q_int, q_scale, k_int, k_scale, row_term, col_term, need, scale, block) -> Tensor:
    b, hq, lq, _ = q_int.shape
    hkv, lk = k_int.shape[1], k_int.shape[2]
    group = hq // hkv
    qb, kb = -(-lq // block), -(-lk // block)
    device = q_int.device
    k_hat = k_int.float() * k_scale.repeat_interleave(block, -1)[..., :lk, None]  # [B, Hkv, Lk, D]
    q_hat = (q_int.float() * q_scale[..., None]).view(b, hkv, group, lq, -1)
    rows_term = row_term.view(b, hkv, group, lq)
    cols_term = col_term.view(b, hkv, group, 1, lk)
    need = need.view(b, hkv, group, lq)
    out = torch.zeros(b, hkv, group, qb, kb, dtype=torch.bool, device=device)
    q_pos = torch.arange(lq, device=device) + (lk - lq)
    k_pos = torch.arange(lk, device=device)
    rows = max(1, _CHUNK // max(b * hq * lk * block, 1)) * block
    for r0 in range(0, lq, rows):
        r1 = min(r0 + rows, lq)
        est = (q_hat[:, :, :, r0:r1] @ k_hat.transpose(-1, -2)[:, :, None] + rows_term[..., r0:r1, None]
               + cols_term) * scale
        hit = (est >= need[..., r0:r1, None]) & (k_pos[None, :] <= q_pos[r0:r1, None])
        hit = torch.nn.functional.pad(hit, (0, kb * block - lk, 0, -(r1 - r0) % block))
        tiles = hit.view(b, hkv, group, -1, block, kb, block).any(-1).any(-2)
        out[:, :, :, r0 // block: r0 // block + tiles.shape[3]] = tiles
    return out.flatten(1, 2)


def _passing_tiles_triton(q_int, q_scale, k_int, k_scale, row_term, col_term, need, scale, block):
    import triton

    from ._sale_kernels import passing_tiles_kernel

    b, hq, lq, d = q_int.shape
    hkv, lk = k_int.shape[1], k_int.shape[2]
    qb, kb = -(-lq // block), -(-lk // block)
    out = torch.zeros(b, hq, qb, kb, dtype=torch.int8, device=q_int.device)
    args = [t.contiguous() for t in (q_int, q_scale.float(), k_int, k_scale.float(), row_term.float(),
                                     col_term.float(), need.float())]
    passing_tiles_kernel[(b * hq, qb)](*args, out, LQ=lq, LK=lk, D=d, HQ=hq, GROUP=hq // hkv, KB=kb,
                                       SCALE=float(scale), BLOCK=block, BLOCK_D=max(32, triton.next_power_of_2(d)),
                                       KB_LOOP=triton.next_power_of_2(kb))
    return out.bool()
