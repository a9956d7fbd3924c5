"""SALE's estimation pass: which tiles hold a quantised logit that reaches a per-query threshold.

``passing_tiles(q_int, q_scale, k_int, k_scale, row_term, col_term, need, scale, block)`` returns
``[B, Hq, Qb, Kb]`` bool: tile ``(r, c)`` passes when some query ``i`` in block ``r`` and visible key ``j`` in
block ``c`` have

    scale * (q_int_i . k_int_j * q_scale_i * k_scale_c + row_term_i + col_term_j) >= need_i

(queries are the last ``Lq`` of the ``Lk`` positions; keys after a query never count).

``naive``: plain PyTorch over chunks of query rows (linear memory, quadratic work). ``triton``: one program
per (query block, up to 4 query heads of one KV head) walking the visible key blocks, each K tile loaded once
for its heads, with tensor-core dot products of the integer values (exact in fp16), nothing larger than a
tile in memory; on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` for tests. The two agree up to the last
bit of the estimate (they round the scale products differently), so only a threshold within an ulp of an
estimate can tell them apart.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .vertical_slash import triton_available

_CHUNK = 1 << 24


def passing_tiles(q_int, q_scale, k_int, k_scale, row_term, col_term, need, scale: float, block: int,
                  backend: str = "auto") -> Tensor:
    if backend == "auto":
        use_kernel = q_int.is_cuda and triton_available() and kernel_agrees(q_int.device, block, q_int.shape[-1])
        backend = "triton" if use_kernel else "naive"
    if backend == "naive":
        return passing_tiles_naive(q_int, q_scale, k_int, k_scale, row_term, col_term, need, scale, block)
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'naive', got {backend!r}")
    return _passing_tiles_triton(q_int, q_scale, k_int, k_scale, row_term, col_term, need, scale, block)


_AGREES: dict = {}


def kernel_agrees(device, block: int, dim: int) -> bool:
    """Whether the Triton kernel matches ``passing_tiles_naive`` on this device, checked once per (device, block,
    head dim) on a small random case (GQA, ragged lengths, prefix keys, thresholds near each row's best).

    CI runs the kernel under Triton's interpreter, which needs a static loop bound, so the runtime-bounded loop
    that CUDA compiles is only exercised on a GPU: a mismatch there gives one warning and the plain-PyTorch
    path, never a silently wrong pattern."""
    key = (str(device), block, dim)
    if key not in _AGREES:
        args = _check_case(device, block, dim)
        try:
            same = torch.equal(_passing_tiles_triton(*args), passing_tiles_naive(*args))
        except Exception as error:  # noqa: BLE001 -- any kernel failure means: do not use it
            same, reason = False, f"{type(error).__name__}: {error}"
        else:
            reason = "its tiles differ from the reference's"
        if not same:
            import warnings

            warnings.warn(f"sparsa: SALE's Triton estimation kernel failed its check on {device} ({reason}); "
                          "using the plain-PyTorch estimate", stacklevel=3)
        _AGREES[key] = same
    return _AGREES[key]


def _check_case(device, block: int, dim: int):
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, lq, lk = 2, 8, 2, 3 * block + 7, 4 * block + 13
    q = torch.randint(-7, 8, (b, hq, lq, dim), generator=g, dtype=torch.int8)
    k = torch.randint(-7, 8, (b, hkv, lk, dim), generator=g, dtype=torch.int8)
    q_scale, k_scale = torch.rand(b, hq, lq, generator=g) + 0.5, torch.rand(b, hkv, -(-lk // block), generator=g) + 0.5
    row, col = torch.randn(b, hq, lq, generator=g), torch.randn(b, hq, lk, generator=g)
    need = torch.randn(b, hq, lq, generator=g) * 20 + 90  # about half the visible tiles pass
    args = [t.to(device) for t in (q, q_scale, k, k_scale, row, col, need)]
    return (*args, 1.0 / dim ** 0.5, block)


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


def _heads_per_program(group: int, block: int, block_d: int) -> int:
    """Query heads of one KV head per program: 4, 2 or 1, the most that divide ``group`` while their fp16 q
    tiles and two K buffers fit in 112 KB of shared memory, so two programs share an SM (4 at 64-query blocks
    and D 128: 96 KB). Each K tile loaded then serves all of them."""
    for heads in (4, 2):
        if group % heads == 0 and (heads + 2) * block * block_d * 2 <= 112 * 1024:
            return heads
    return 1


def _passing_tiles_triton(q_int, q_scale, k_int, k_scale, row_term, col_term, need, scale, block):
    import triton

    from ._sale_kernels import passing_tiles_kernel

    b, hq, lq, d = q_int.shape
    hkv, lk = k_int.shape[1], k_int.shape[2]
    qb, kb = -(-lq // block), -(-lk // block)
    group = hq // hkv
    block_d = max(16, triton.next_power_of_2(d))
    heads = _heads_per_program(group, block, block_d)
    out = torch.zeros(b, hq, qb, kb, dtype=torch.int8, device=q_int.device)
    # K in fp16 once here (exact for these integers; 256 MB at 128K with 8 KV heads): the kernel copies K tiles
    # straight into shared memory for the tensor cores. Q stays int8: the kernel converts it once per program.
    args = [q_int.contiguous(), q_scale.float().contiguous(), k_int.to(torch.float16).contiguous()]
    args += [t.float().contiguous() for t in (k_scale, row_term, col_term, need)]
    # Triton 3.6's interpreter cannot take a tensor as a loop bound: there the kernel loops over all key blocks.
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    # 4 warps (one warpgroup: a 64-row wgmma) for 64-query blocks, 8 for 128. 2 stages: the next K tile loads
    # while this one feeds HEADS dots (~1000 cycles of tensor work at 4 heads, more than L2 latency); a third
    # buffer would take shared memory (16 KB) that the second program on the SM needs.
    passing_tiles_kernel[(qb, b * hq // heads)](
        *args, out, LQ=lq, LK=lk, QB=qb, KB=kb, D=d, HQ=hq, GROUP=group, HEADS=heads, SCALE=float(scale),
        BLOCK=block, BLOCK_D=block_d, STATIC_LOOP=interpret,
        KB_LOOP=kb if interpret else 0, num_warps=8 if block >= 128 else 4, num_stages=2)
    return out.bool()
