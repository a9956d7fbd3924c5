"""HiP's tree search scored by Quest bounds, as one Triton kernel: the estimation step of
``sparsa.prefill.hip.HiP(scoring="bound")`` (Lee et al., "A Training-Free Sub-quadratic Cost Transformer Model
Serving Framework With Hierarchically Pruned Attention", ICLR 2025; the bound after Tang et al., "Quest:
Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024).

Per (sequence, KV head, query block), starting from ``k`` contiguous block ranges: ``levels`` times, halve every
range, score each half by ``max`` over the block's sampled queries (and the KV group's query heads) of
``relu(q) . kmax + min(q, 0) . kmin`` over the half's keys, and keep the ``k`` best halves. The max / min of any
range comes from a sparse table over the key blocks (two overlapping power-of-two windows).

Two implementations with the same contract: ``naive`` is the selector's PyTorch search (``HiP._search_bound``,
about ten ops per level, batched over everything: on the GPU at 8K tokens its ~80 launches cost more than the
arithmetic), passed in as ``reference``; ``triton`` is two launches, the sparse table then the whole search with
one program per query block, its nodes, samples and scores in registers. The kernels run on CUDA, and on the CPU
under ``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor

from ._fallback import dispatch
from .quest import pow2

# Sampled rows (samples x group heads, powers of two) and kept nodes one program may hold: its samples, the
# [2D, 2k] bounds of the children and the [2k, 2k] ranking tile stay in registers (k = 32: 4096 compares).
# Larger searches go to PyTorch.
_MAX_ROWS = 256
_MAX_TOPK = 32


def hip_search(q: Tensor, k: Tensor, nodes: Tensor, levels: int, *, block: int, samples: int, widest: int,
               causal: bool, reference: Callable[[], Tensor], key_real: Tensor | None = None,
               backend: str = "auto") -> Tensor:
    """The kept block ranges ``[B, Hkv, Qb, k, 2]`` (int64 ``[lo, hi)``) after ``levels`` levels of HiP's
    bound-scored search (module docstring).

    ``q [B, Hq, Lq, D]`` (the last ``Lq`` positions), ``k [B, Hkv, Lk, D]``; ``nodes [Qb, k, 2]`` the initial
    ranges (shared by every sequence and head), at most ``widest`` blocks each; ``samples`` queries per query
    block (``sparsa.prefill.estimate.sample_rows``); ``causal``: a sample scores only the ranges whose first
    block it sees (needed without a window block before the diagonal, or with padding); ``key_real [B, Lk]``
    (True = real token): padded keys take no part, a range without a real key is dead, padded samples do not
    score. ``reference()`` computes the same with PyTorch (``HiP._search_bound``): the naive backend, and the
    fallback of a failing kernel. The kept ranges come best first, as the reference's; ties go to the lower
    child. ``backend``: auto | triton | naive (auto: Triton for CUDA tensors when it is
    installed).
    """
    topk = nodes.shape[-2]
    rows = pow2(samples) * pow2(q.shape[1] // k.shape[1])

    def fast():
        return _hip_search_triton(q, k, nodes, levels, block, samples, widest, causal, key_real)

    # tl.dot has no float64; more rows or nodes than a program holds would spill registers: PyTorch does those.
    return dispatch("hip_search", backend, on_gpu=q.is_cuda, fast=fast, reference=reference,
                    supported=q.dtype != torch.float64 and rows <= _MAX_ROWS and topk <= _MAX_TOPK)


def table_levels(widest: int, kb: int) -> int:
    """Levels of the sparse table for ranges of up to ``widest`` blocks: ``2^(J-1) <= widest < 2^J`` (as
    ``sparsa.prefill.hip.bound_table``'s)."""
    return max(1, min(widest, kb)).bit_length()


def _hip_search_triton(q, k, nodes, levels, block, samples, widest, causal, key_real):
    from ..prefill.estimate import sample_rows  # lazy: ops never import prefill at import time
    from ._hip_kernels import search_kernel, table_kernel

    batch, hq, lq, dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    qb, topk = nodes.shape[0], nodes.shape[1]
    kb = -(-lk // block)
    out = torch.empty(batch, hkv, qb, topk, 2, dtype=torch.long, device=q.device)
    if out.numel() == 0:
        return out
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret or q.dtype != k.dtype:
        # Triton's CPU interpreter computes bf16 dot products wrongly (NumPy has no bf16), and the PyTorch path
        # works in float32 anyway; mixed dtypes meet in float32.
        q, k = q.float(), k.float()
    # The kernels read any [B, H, L, D] layout with unit stride over D (a model's q and k are transposed views):
    # no copy of q or k per call.
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    real = None if key_real is None else key_real.to(device=q.device, dtype=torch.bool).contiguous().view(torch.int8)
    block_d = max(16, pow2(dim))

    # Launch 1: the sparse table, in k's dtype (a max / min of keys is exact in it, and it is the dot's operand).
    # 16 dims per program (8 programs per KV head at D = 128, each reading 32-byte rows of bf16 keys); a
    # [blocks, positions, dims] key tile of 4K elements: 32 fp32 registers a thread at 4 warps.
    n_levels = table_levels(-(-widest // 2), kb)  # children are at most ceil(widest / 2) blocks
    kmax = torch.empty(batch * hkv, n_levels * kb, dim, dtype=k.dtype, device=k.device)
    kmin = torch.empty_like(kmax)
    dt = min(16, block_d)
    rows_k = min(pow2(block), 64)
    tb = min(max(1, 4096 // (rows_k * dt)), pow2(kb))
    n_tiles = -(-kb // tb)
    table_kernel[(batch * hkv, -(-dim // dt))](
        k, k if real is None else real, kmax, kmin, lk, kb, n_tiles, *k.stride()[:3], HKV=hkv, D=dim, BLOCK=block,
        LEVELS=n_levels, HAS_REAL=real is not None, DT=dt, TB=tb, ROWS=rows_k, STATIC_LOOP=interpret,
        N_LOOP=n_tiles if interpret else 0)

    # Launch 2: the search, one program per (sequence x KV head, query block). At least 16 sample rows and 32
    # children slots: tl.dot's minimum tile (the extra rows and slots are masked).
    s_p2 = pow2(samples)
    g_p2 = max(pow2(group), -(-16 // s_p2))
    k_p2 = max(8, pow2(topk))
    rows = sample_rows(lq, block, samples, q.device)  # [Qb, S] int64
    # float32 dots run without tensor cores and hold more per thread: 8 warps (ptxas for sm_90 at ref-small's 64
    # rows x D = 128: bf16 at 4 warps 128 registers, no spill; fp32 ~300 bytes of spills at 8 warps, more at 4 or 16)
    ieee = q.dtype == torch.float32
    search_kernel[(batch * hkv, qb)](
        q, rows, q if real is None else real, nodes.contiguous(), kmax, kmin, out, lq, lk, kb, topk, *q.stride()[:3],
        HQ=hq, HKV=hkv, GROUP=group, SAMPLES=samples, BLOCK=block, D=dim, BLOCK_D=block_d, S_P2=s_p2, G_P2=g_p2,
        K_P2=k_p2, LEVELS=levels, TABLE_LEVELS=n_levels, CAUSAL=causal, HAS_REAL=real is not None,
        IEEE=ieee, num_warps=8 if ieee or s_p2 * g_p2 * block_d > 8192 else 4)
    return out


__all__ = ["hip_search", "table_levels"]
