"""Quest bounds of key blocks against sampled queries, reduced per query block: the estimation step of the
``scoring="bound"`` selectors (BiFormer's routing, LongHeads' chunk scores), after Tang et al., "Quest:
Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024.

``quest_scores(q, k, block, samples)`` represents each run of ``block`` keys by its elementwise max and min and
bounds any query's dot product with the run by ``relu(q) . kmax + min(q, 0) . kmin``; a query block takes the
max of that bound over ``samples`` of its queries (and over the query heads of a KV group unless ``per_head``).

Two implementations with the same contract: ``naive`` (plain PyTorch, about fifteen ops: on the GPU at 8K
tokens their launches cost more than the arithmetic) and ``triton`` (two launches: the per-block key max / min,
then the bounds of every query block's samples against all key blocks, reduced in registers, so nothing
larger than a tile of ``samples x key blocks`` is ever in memory). The kernels run on CUDA, and on the CPU
under ``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ._fallback import dispatch

# Sampled query rows one program of the scores kernel may hold (its query tile and a key tile's accumulator
# stay in registers and shared memory); more rows per query block than this go to the PyTorch path.
_MAX_ROWS = 256


def quest_scores(q: Tensor, k: Tensor, block: int, samples: int, *, key_real: Tensor | None = None,
                 query_real: Tensor | None = None, per_head: bool = False, pieces: int = 1, backend: str = "auto",
                 max_elements: int = 1 << 26) -> Tensor:
    """Quest bounds of key blocks against sampled queries, reduced per query block (Tang et al., ICML 2024).

    ``q [B, Hq, Lq, D]`` (the last ``Lq`` positions), ``k [B, Hkv, Lk, D]``. Each query block is represented by
    ``samples`` of its queries (``sparsa.prefill.estimate.sample_rows``); each run of ``block`` keys by its
    elementwise max / min (:func:`block_bounds`). Returns float32 ``[B, Hkv, Qb, nb // pieces]``
    (``per_head``: ``[B, Hq, ...]``): the max over the samples (and over the query heads of a KV group unless
    ``per_head``) of the bound, then over runs of ``pieces`` consecutive key blocks (``nb`` must be a multiple
    of ``pieces``).

    ``key_real [B, Lk]`` / ``query_real [B, Lq]`` (True = real token): padded keys take no part, a key block of
    padding only scores -inf, and padded sampled queries do not score. ``backend``: auto | triton | naive (auto:
    Triton for CUDA tensors when it is installed). ``max_elements`` bounds the naive path's slices.
    """
    nb = -(-k.shape[2] // block)
    if not isinstance(pieces, int) or pieces < 1 or nb % pieces:
        raise ValueError(f"pieces must be an int >= 1 dividing the {nb} key blocks, got {pieces!r}")
    rows = pow2(samples) * (1 if per_head else pow2(q.shape[1] // k.shape[1]))

    def reference():
        return quest_scores_naive(q, k, block, samples, key_real=key_real, query_real=query_real,
                                  per_head=per_head, pieces=pieces, max_elements=max_elements)

    def fast():
        return _quest_scores_triton(q, k, block, samples, key_real, query_real, per_head, pieces)

    # tl.dot has no float64, and a query block with more sampled rows than one program holds (hundreds: samples
    # far beyond the default 16 with 8 query heads per KV head) would spill registers: PyTorch does those.
    return dispatch("quest_scores", backend, on_gpu=q.is_cuda, fast=fast, reference=reference,
                    supported=q.dtype != torch.float64 and rows <= _MAX_ROWS)


def block_bounds(k: Tensor, block: int, real: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Elementwise max and min of the keys of each run of ``block`` positions: ``(kmax, kmin)``, each
    ``[B, H, nb, D]`` float32 (the last block may be shorter).

    ``real [B, L]`` (True = real key): padded keys take no part; a block made only of padding gets
    ``kmax = -inf`` and ``kmin = +inf`` (callers mask such blocks).
    """
    batch, heads, length, dim = k.shape
    nb = -(-length // block)
    tail = nb * block - length
    hi, lo = k, k
    if real is not None:
        keep = real[:, None, :, None]
        hi = k.masked_fill(~keep, float("-inf"))
        lo = k.masked_fill(~keep, float("inf"))
    if tail:  # pad with the neutral element of each reduction, so the short last block is exact
        hi = torch.nn.functional.pad(hi, (0, 0, 0, tail), value=float("-inf"))
        lo = torch.nn.functional.pad(lo, (0, 0, 0, tail), value=float("inf"))
    kmax = hi.reshape(batch, heads, nb, block, dim).amax(3).float()
    kmin = lo.reshape(batch, heads, nb, block, dim).amin(3).float()
    return kmax, kmin


def quest_scores_naive(q: Tensor, k: Tensor, block: int, samples: int, *, key_real: Tensor | None = None,
                       query_real: Tensor | None = None, per_head: bool = False, pieces: int = 1,
                       max_elements: int = 1 << 26) -> Tensor:
    """Plain PyTorch, the reference. The bound is ``relu(q) . kmax + min(q, 0) . kmin``: one matmul over a
    doubled head dim, in q's dtype on the GPU (the scores are only ranked) and float32 on the CPU, in slices of
    query blocks of at most ``max_elements`` scores, so memory stays linear in length."""
    from ..prefill.estimate import sample_rows  # lazy: ops never import prefill at import time

    batch, hq, lq, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    kmax, kmin = block_bounds(k, block, key_real)  # [B, Hkv, nb, D]
    nb = kmax.shape[2]
    dead = torch.isinf(kmax[..., 0]) if key_real is not None else None  # [B, Hkv, nb] blocks without a real key
    dtype = q.dtype if q.is_cuda else torch.float32
    keys = torch.cat((kmax, kmin), -1)
    if dead is not None:  # zeroed so that 0 * inf never happens; masked below
        keys = keys.masked_fill(dead[..., None], 0)
        dead = dead[:, :, None, None, None, :]  # [B, Hkv, 1, 1, 1, nb]
    keys = keys.to(dtype).transpose(-1, -2)  # [B, Hkv, 2D, nb]
    rows = sample_rows(lq, block, samples, q.device)  # [Qb, S]
    qb = rows.shape[0]
    qs = q.index_select(2, rows.flatten()).view(batch, hkv, group, qb, samples, dim)
    q_dead = None
    if query_real is not None:  # [B, 1, 1, Qb, S, 1]
        q_dead = ~query_real.index_select(1, rows.flatten()).view(batch, 1, 1, qb, samples, 1)
    step = max(1, max_elements // max(1, batch * hq * samples * max(nb, 2 * dim)))
    parts = []
    for start in range(0, qb, step):
        part = qs[:, :, :, start:start + step].to(dtype)
        n = part.shape[3]
        part = torch.cat((part.clamp(min=0), part.clamp(max=0)), -1)  # [B, Hkv, G, n, S, 2D]
        scores = (part.reshape(batch, hkv, group * n * samples, 2 * dim) @ keys).view(batch, hkv, group, n,
                                                                                       samples, nb)
        if dead is not None:
            scores = scores.masked_fill(dead, float("-inf"))
        if pieces > 1:
            scores = scores.view(batch, hkv, group, n, samples, nb // pieces, pieces).amax(-1)
        if q_dead is not None:
            scores = scores.masked_fill(q_dead[:, :, :, start:start + n], float("-inf"))
        parts.append((scores.amax(4) if per_head else scores.amax((2, 4))).float())
    if not parts:  # no query (Lq = 0)
        return torch.empty(batch, hq if per_head else hkv, 0, nb // pieces, device=q.device)
    out = parts[0] if len(parts) == 1 else torch.cat(parts, -2)  # [B, Hkv, (G,) Qb, nb // pieces]
    return out.reshape(batch, hq, qb, -1) if per_head else out


def pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``): Triton tile sizes."""
    return 1 << max(0, n - 1).bit_length()


def _quest_scores_triton(q, k, block, samples, key_real, query_real, per_head, pieces):
    from ..prefill.estimate import sample_rows  # lazy: ops never import prefill at import time
    from ._quest_kernels import bounds_kernel, scores_kernel

    batch, hq, lq, dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    nb = -(-lk // block)
    n_out = nb // pieces
    rows = sample_rows(lq, block, samples, q.device)  # [Qb, S]
    qb = rows.shape[0]
    heads = hq if per_head else hkv
    out = torch.empty(batch, heads, qb, n_out, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret:
        # Triton's CPU interpreter computes bf16 dot products wrongly (NumPy has no bf16), and the PyTorch path
        # works in float32 on the CPU anyway.
        q, k = q.float(), k.float()
    # The kernels read any [B, H, L, D] layout with unit stride over D (a model's q and k are transposed views):
    # no copy of q or k per call.
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    block_d = max(16, pow2(dim))
    # Kernel 1: per key block its max / min in q's dtype (exact for keys of that dtype), zero for blocks of
    # padding only (so no 0 * inf reaches the dot), and whether the block has a real key.
    kmax = torch.empty(batch * hkv, nb, dim, dtype=q.dtype, device=q.device)
    kmin = torch.empty_like(kmax)
    alive = torch.empty(batch * hkv, nb, dtype=torch.int8, device=q.device)
    # Positions x dims per loaded key tile: 32 fp32 registers a thread at 4 warps. (The interpreter runs the same
    # tiles, so the tests cover the GPU's tiling; it is fast enough at test sizes.)
    budget = 1 << 12
    rows_k = min(pow2(block), max(1, budget // block_d))
    tile = min(max(1, budget // (rows_k * block_d)), pow2(nb))
    key_real = _flags(key_real, k)
    bounds_kernel[(batch * hkv, -(-nb // tile))](
        k, key_real, kmax, kmin, alive, lk, nb, *k.stride()[:3], HKV=hkv, D=dim, BLOCK=block,
        HAS_REAL=key_real is not k, TILE=tile, ROWS=rows_k, BLOCK_D=block_d)
    # Kernel 2: a program holds QT query blocks' sampled rows (x every query head of the group unless
    # per_head) and walks all key blocks BLOCK_N at a time, BLOCK_N = BLOCK_C output columns x PIECES_P2.
    s_p2 = pow2(samples)
    g_p2 = 1 if per_head else pow2(group)
    per_block = s_p2 * g_p2
    # About 64 rows per program (at least 16: tl.dot's minimum), and a [rows, BLOCK_N] float32 accumulator
    # within 8K elements where the pieces allow: few registers, and programs enough to fill the GPU.
    qt = min(max(1, 64 // per_block), max(pow2(qb), -(-16 // per_block)))
    pieces_p2 = pow2(pieces)
    block_n = max(16, pieces_p2, min(64, 8192 // (qt * per_block)))
    block_c = block_n // pieces_p2
    n_tiles = -(-n_out // block_c)
    query_real = _flags(query_real, q)
    scores_kernel[(batch * heads, -(-qb // qt))](
        q, rows.reshape(-1), query_real, kmax, kmin, alive, out, lq, qb, nb, n_out, n_tiles, *q.stride()[:3],
        HQ=hq, HKV=hkv, GROUP=group, SAMPLES=samples, PIECES=pieces, PER_HEAD=per_head,
        HAS_REAL=query_real is not q, D=dim, BLOCK_D=block_d, QT=qt, G_P2=g_p2, S_P2=s_p2, PIECES_P2=pieces_p2,
        BLOCK_C=block_c, IEEE=q.dtype == torch.float32, STATIC_LOOP=interpret,
        N_LOOP=n_tiles if interpret else 0, num_warps=8 if qt * per_block * block_n > 4096 else 4)
    return out


def _flags(real: Tensor | None, fallback: Tensor) -> Tensor:
    """``real`` (bool) as int8 for the kernel, or ``fallback`` (any tensor: a pointer the kernel never reads)."""
    if real is None:
        return fallback
    return real.to(device=fallback.device, dtype=torch.bool).contiguous().view(torch.int8)
