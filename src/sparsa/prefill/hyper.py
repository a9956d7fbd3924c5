"""HyperAttention: sortLSH block-diagonal attention plus uniformly sampled keys, merged by log-sum-exp.

Han et al., "HyperAttention: Long-context Attention in Near-Linear Time" (ICLR 2024); the method as released in
insuhan/hyper-attn (defaults ``lsh_num_projs=7, block_size=256, sample_size=256, min_seq_len=4096``).

Non-causal core (queries ``Q``, keys ``K``):

1. sortLSH: angular LSH with ``lsh_num_projs`` random hyperplanes; a token's bucket is its sign pattern, ranked
   in Gray-code order (consecutive buckets differ in one sign); queries and keys are sorted by bucket.
2. Block-diagonal exact attention in sorted order: the sorted keys in blocks of ``block_size``, the sorted
   queries in as many blocks, query block ``i`` against key block ``i``; output and log-sum-exp (lse) kept.
   Run as one call of :func:`sparsa.ops.block_sparse_attention` on the sorted tensors with a block-diagonal
   :class:`~sparsa.BlockPattern` (non-causal).
3. ``sample_size`` keys drawn uniformly with replacement; every query attends to them, with the samples that
   fall in its own diagonal block masked out (those pairs are already exact), and ``log(n / m)`` added to the
   lse (importance weight: an unbiased estimate of the off-diagonal sum).
4. Both parts merged by lse (:func:`sparsa.ops.merge_attention`), rows put back in their order.

Causal attention (the official recursion): up to ``min_seq_len`` keys, exact causal attention; above, split
the sequence into halves, handle both diagonal halves causally (recursively) and the lower-left quadrant
(second-half queries, first-half keys) with the non-causal core, and merge by lse. The core itself is exact
when it has fewer than ``min_seq_len`` queries or a single key block.

Implementation (all batched over batch and heads; memory linear in length):

- The recursion is unrolled by levels. With ``d`` halvings the (query-side) length ``n`` is zero-padded at the
  end to ``s * 2**d`` (``s = ceil(n / 2**d) <= min_seq_len``; the official code pads each odd half by one row
  at its end, giving the same segment sizes up to where the pad rows sit). The ``2**d`` diagonal leaves are one
  causal kernel call with the leaves folded into the batch; each level's ``2**l`` lower-left quadrants are one
  call of the core with the segments folded into the batch. Pad rows are masked out.
- Prefix KV (``Lq < Lk``, queries the last ``Lq`` positions): the causal square over the last ``Lq`` keys as
  above; the prefix keys are one non-causal block (all queries see all of them), handled by the core; merged.
- GQA: queries are hashed and sorted per query head, keys per KV head, with the same hyperplanes; the kernel
  takes the KV heads as they are (never repeated). Samples are drawn per KV head and shared by its group.
- Key padding (``key_padding_mask``): padded keys get zero weight everywhere. They are hashed to an extra last
  bucket so they sort after the real keys of every head; the sorted padding mask is then "position <
  real count", passed to the kernel; samples are drawn among the real keys only (weight ``n_real / m``).
  Padded queries also sort last. The block-diagonal query-to-key block map matches quantiles of the real
  tokens (query block ``i`` of ``n_blocks`` to key block ``i`` when nothing is padded and the counts agree).
- Query blocks: ``block_size`` tokens, halved (down to 16) until there are at least as many query blocks as
  key blocks (the official code divides the queries into exactly as many blocks as keys); block sizes stay
  powers of two so the compiled kernel can tile them.
- Randomness: hyperplanes and samples come from a generator seeded by ``seed`` and the layer index, so a run
  is reproducible and layers use different hyperplanes (the official code has one LSH module per layer).

Density (``attend``'s second result): the fraction of the causally visible 128x128 tiles of ``(Lq, Lk)``
computed, counted as follows: exact kernel calls by the 128-tiles they visit (causal or full), the
block-diagonal part as ``n_q * block_size / 128**2`` tile-equivalents (query rows times keys in their block),
the sampled part as ``n_q * sample_size / 128**2``; pad rows count. Hashing and sorting are not counted.
Clipped at 1. It is an estimate of work (pairs scored), not of which tiles a block-sparse kernel would visit.

Differences from the official code: Gray-code rank (the official ``perm[bin]`` sorts by the Gray code of the
bin, whose neighbours may differ in several signs; here buckets are ordered by their position in the Gray
sequence); samples are always masked against the query's diagonal block (the official CUDA path does not,
double counting those pairs); sampling runs whenever there is more than one key block (the official code
also skips it when the queries fit one block); key padding is supported (the official code has none);
prefix KV and GQA are supported (the official recursion assumes ``Lq == Lk`` and equal head counts).

``select`` raises ``NotImplementedError``: the computation is not one block pattern (the sorted order differs
per head and level, and the sampled part is not tile-aligned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..pattern import BlockPattern, last_visible_block
from ..registry import register
from .base import Selector, check_block, check_int

_TILE = 128  # density unit: 128 x 128 tiles, as sparsa.stats weighs layers
_MAX_PROJS = 16
_MIN_QUERY_BLOCK = 16
_SAMPLE_CHUNK = 1 << 24  # elements of one chunk of the sampled-column scores


@register("prefill", "hyper")
@dataclass
class Hyper(Selector):
    """HyperAttention (sortLSH block-diagonal + uniform key samples), causal by the official recursion."""

    lsh_num_projs: int = 7
    block_size: int = 256
    # Dense SDPA below this key length: measured against torch's default SDPA (cuDNN) on the H200,
    # estimation included (0.51x at 32K, 1.39x at 128K; BENCHMARKS.md, session 3).
    dense_below: int = 131072
    sample_size: int = 256
    min_seq_len: int = 4096
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "lsh_num_projs")
        if self.lsh_num_projs > _MAX_PROJS:
            raise ValueError(f"{self.name}: lsh_num_projs must be <= {_MAX_PROJS}, got {self.lsh_num_projs}")
        check_block(self, "block_size")
        check_int(self, "sample_size", minimum=0)
        check_int(self, "min_seq_len")
        check_int(self, "seed", minimum=0)

    def select(self, q, k, *, layer_idx=None):
        raise NotImplementedError(
            "hyper: HyperAttention is not one block pattern (LSH-sorted block-diagonal attention per head plus "
            "sampled keys, merged by log-sum-exp); call attend(q, k, v, ...) instead")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
               key_padding_mask: Tensor | None = None, backend: str = "auto",
               layer_idx: int | None = None) -> tuple[Tensor, float]:
        """Causal HyperAttention: ``(out [B, Hq, Lq, Dv], density)``; queries are the last ``Lq`` positions."""
        from ..ops import block_sparse_attention

        _check_inputs(q, k, v, key_padding_mask)
        batch, _, lq, dim = q.shape
        lk = k.shape[2]
        scale = dim ** -0.5 if scale is None else scale
        if lk <= self.min_seq_len:
            out = block_sparse_attention(q, k, v, None, causal=True, scale=scale, key_padding_mask=key_padding_mask,
                                         backend=backend, validate=False)
            return out, 1.0
        run = _Run(self, q, scale, backend, layer_idx)
        prefix = lk - lq
        valid = key_padding_mask
        q_valid = None if valid is None else valid[:, prefix:]
        out, lse = run.causal_square(q, k[:, :, prefix:], v[:, :, prefix:], q_valid, valid is not None)
        if prefix:
            k_valid = None if valid is None else valid[:, :prefix]
            out_p, lse_p = run.core(q, k[:, :, :prefix], v[:, :, :prefix], q_valid, k_valid)
            out, lse = _merge(out, lse, out_p, lse_p)
        density = min(1.0, run.work / (batch * _causal_tiles(lq, lk)))
        return out.to(q.dtype), density

    def attend_noncausal(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                         key_padding_mask: Tensor | None = None, backend: str = "auto",
                         layer_idx: int | None = None) -> tuple[Tensor, Tensor]:
        """The non-causal core on its own: ``(out [B, Hq, Lq, Dv], lse [B, Hq, Lq])`` (all keys visible to all
        queries; exact below ``min_seq_len`` queries or with a single key block)."""
        _check_inputs(q, k, v, key_padding_mask, causal=False)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        run = _Run(self, q, scale, backend, layer_idx)
        out, lse = run.core(q, k, v, None, key_padding_mask)
        return out.to(q.dtype), lse


class _Run:
    """One attention call: the random state, the hyperplanes and the work counter."""

    def __init__(self, cfg: Hyper, q: Tensor, scale: float, backend: str, layer_idx):
        self.cfg = cfg
        self.scale = float(scale)
        self.backend = backend
        self.device = q.device
        self.acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        layer = -1 if layer_idx is None else int(layer_idx)
        self.gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + layer + 1) % (1 << 63))
        r = cfg.lsh_num_projs
        self.proj = torch.randn(q.shape[-1], r, generator=self.gen).to(q.device, q.dtype)
        self.pow2 = (2 ** torch.arange(r, device=q.device)).to(torch.long)
        self.rank = _gray_rank(r).to(q.device)
        self.work = 0.0  # computed 128x128 tile-equivalents, summed over the (folded) batch

    # --------------------------------------------------------------------------------------- kernels
    def kernel(self, q, k, v, pattern, *, causal, key_valid):
        """:func:`sparsa.ops.block_sparse_attention` with the lse, in the accumulation dtype. Non-causal calls
        may have more queries than keys (the prefix part): the keys are then zero-padded to the query count,
        the pad masked, and the pattern keeps to the real key blocks (no tile of pad keys is computed)."""
        from ..ops import block_sparse_attention

        batch, _, nq, _ = q.shape
        nk = k.shape[2]
        if nq > nk:
            extra = nq - nk
            k, v = F.pad(k, (0, 0, 0, extra)), F.pad(v, (0, 0, 0, extra))
            real = torch.ones(batch, nk, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
            key_valid = torch.cat([real, torch.zeros(batch, extra, dtype=torch.bool, device=q.device)], 1)
            if pattern is None:
                qb, kb = _cdiv(nq, _TILE), _cdiv(nk, _TILE)
                idx = torch.arange(kb, dtype=torch.int32, device=q.device).expand(1, 1, qb, kb)
                pattern = BlockPattern(torch.full((1, 1, qb), kb, dtype=torch.int32, device=q.device), idx,
                                       _TILE, _TILE, nq, nq)
        out, lse = block_sparse_attention(q, k, v, pattern, causal=causal, scale=self.scale, return_lse=True,
                                          key_padding_mask=key_valid, backend=self.backend, validate=False)
        return out.to(self.acc), lse.to(self.acc)

    def exact(self, q, k, v, *, causal, key_valid):
        out, lse = self.kernel(q, k, v, None, causal=causal, key_valid=key_valid)
        lq, lk = q.shape[2], k.shape[2]
        tiles = _causal_tiles(lq, lk) if causal else _cdiv(lq, _TILE) * _cdiv(lk, _TILE)
        self.work += q.shape[0] * tiles
        return out, lse

    def hash(self, x: Tensor, valid: Tensor | None) -> Tensor:
        """Gray-code rank of each token's LSH bucket ``[B, H, n]``; padded tokens get the extra last bucket."""
        bits = (x @ self.proj) > 0  # [B, H, n, r]
        rank = self.rank[(bits.long() * self.pow2).sum(-1)]
        if valid is not None:
            rank = torch.where(valid[:, None, :], rank, self.rank.numel())
        return rank

    # ------------------------------------------------------------------------------------------ core
    def core(self, q, k, v, q_valid, k_valid):
        """Non-causal HyperAttention of ``q [B, Hq, nq, D]`` over ``k, v [B, Hkv, nk, D]``: ``(out, lse)`` in the
        accumulation dtype. ``q_valid [B, nq]`` / ``k_valid [B, nk]``: real tokens (None: all)."""
        cfg = self.cfg
        batch, hq, nq, dim = q.shape
        nk, dv = k.shape[2], v.shape[-1]
        bk = cfg.block_size
        if nq < cfg.min_seq_len or nk <= bk:
            return self.exact(q, k, v, causal=False, key_valid=k_valid)
        dev = self.device

        # 1. sortLSH
        q_idx = torch.argsort(self.hash(q, q_valid), dim=-1, stable=True)  # [B, Hq, nq]
        k_idx = torch.argsort(self.hash(k, k_valid), dim=-1, stable=True)  # [B, Hkv, nk]
        qs = q.gather(2, q_idx[..., None].expand(-1, -1, -1, dim))
        ks = k.gather(2, k_idx[..., None].expand(-1, -1, -1, dim))
        vs = v.gather(2, k_idx[..., None].expand(-1, -1, -1, dv))
        nq_real = _counts(q_valid, batch, nq, dev)  # [B]
        nk_real = _counts(k_valid, batch, nk, dev)

        # 2. block-diagonal attention in sorted order
        kb = _cdiv(nk, bk)
        bq = bk
        while bq > _MIN_QUERY_BLOCK and _cdiv(nq, bq) < kb:
            bq //= 2
        qb = _cdiv(nq, bq)
        diag = _diagonal_map(qb, bq, bk, nq_real, nk_real)  # [B, Qb] key block of each query block
        # (kv_len at least nq: with more queries than keys, ``kernel`` pads the keys; no pad block is selected)
        pattern = BlockPattern(torch.ones(batch, 1, qb, dtype=torch.int32, device=dev),
                               diag[:, None, :, None].to(torch.int32), bq, bk, nq, max(nq, nk))
        key_pad = None if k_valid is None else torch.arange(nk, device=dev) < nk_real[:, None]
        out, lse = self.kernel(qs, ks, vs, pattern, causal=False, key_valid=key_pad)
        self.work += batch * nq * bk / _TILE ** 2

        # 3. uniformly sampled keys, minus those in the query's own diagonal block
        m = cfg.sample_size
        if m > 0:
            out_s, lse_s = self.sampled(qs, ks, vs, diag, bq, nk_real)
            out, lse = _merge(out, lse, out_s, lse_s)
            self.work += batch * nq * m / _TILE ** 2

        # 4. back to the original row order
        out = torch.empty_like(out).scatter_(2, q_idx[..., None].expand(-1, -1, -1, dv), out)
        lse = torch.empty_like(lse).scatter_(2, q_idx, lse)
        return out, lse

    def sampled(self, qs, ks, vs, diag, bq, nk_real):
        cfg = self.cfg
        batch, hq, nq, dim = qs.shape
        hkv, dv = ks.shape[1], vs.shape[-1]
        group = hq // hkv
        m, bk, dev = cfg.sample_size, cfg.block_size, self.device
        u = torch.rand(batch, hkv, m, generator=self.gen, dtype=torch.float64).to(dev)
        pick = (u * nk_real[:, None, None]).long().clamp(max=nk_real.clamp(min=1)[:, None, None] - 1)
        k_s = ks.gather(2, pick[..., None].expand(-1, -1, -1, dim)).to(self.acc)  # [B, Hkv, m, D]
        v_s = vs.gather(2, pick[..., None].expand(-1, -1, -1, dv)).to(self.acc)
        sample_block = (pick // bk)[:, :, None, None, :]  # [B, Hkv, 1, 1, m]
        query_block = diag[:, torch.arange(nq, device=dev) // bq]  # [B, nq]: diagonal key block per sorted row
        # n_real / m; no real key at all: -inf (the part is empty)
        log_w = torch.log(nk_real.to(self.acc)) - math.log(m)
        out = torch.empty(batch, hq, nq, dv, dtype=self.acc, device=dev)
        lse = torch.empty(batch, hq, nq, dtype=self.acc, device=dev)
        step = max(1, _SAMPLE_CHUNK // max(1, batch * hq * m))
        for c0 in range(0, nq, step):
            c1 = min(c0 + step, nq)
            qc = qs[:, :, c0:c1].reshape(batch, hkv, group, c1 - c0, dim).to(self.acc)
            scores = torch.einsum("bkgcd,bkmd->bkgcm", qc, k_s) * self.scale
            own = query_block[:, None, None, c0:c1, None] == sample_block
            scores = scores.masked_fill(own, float("-inf"))
            lse_c = torch.logsumexp(scores, -1)
            probs = torch.exp(scores - torch.where(torch.isfinite(lse_c), lse_c, 0.0)[..., None])
            out[:, :, c0:c1] = torch.einsum("bkgcm,bkmd->bkgcd", probs, v_s).reshape(batch, hq, c1 - c0, dv)
            lse[:, :, c0:c1] = lse_c.reshape(batch, hq, c1 - c0) + log_w[:, None, None]
        return out, lse

    # ---------------------------------------------------------------------------------------- causal
    def causal_square(self, q, k, v, valid, padded):
        """Causal attention of ``q [B, Hq, n, D]`` over the ``n`` keys at the same positions, by the official
        recursion unrolled into levels. ``valid [B, n]``: real tokens (None: all); ``padded``: whether
        ``valid`` holds key padding (else it is None)."""
        cfg = self.cfg
        batch, hq, n, dim = q.shape
        hkv, dv = k.shape[1], v.shape[-1]
        depth = 0
        while _cdiv(n, 2 ** depth) > cfg.min_seq_len:
            depth += 1
        if depth == 0:
            return self.exact(q, k, v, causal=True, key_valid=valid)
        leaves = 2 ** depth
        s = _cdiv(n, leaves)
        extra = s * leaves - n
        if extra:
            q, k, v = (F.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
            real = torch.ones(batch, n, dtype=torch.bool, device=self.device) if valid is None else valid
            valid = torch.cat([real, torch.zeros(batch, extra, dtype=torch.bool, device=self.device)], 1)
        # Pad rows sit after every real query, so causal masking hides them in the leaves; as keys of a
        # lower-left quadrant they only appear when they reach into a first half (extra > s).
        key_valid = valid if (padded or extra > s) else None

        # the 2**depth diagonal leaves, exact and causal, folded into the batch
        out, lse = self.exact(_fold(q, leaves), _fold(k, leaves), _fold(v, leaves), causal=True,
                              key_valid=None if key_valid is None else key_valid.reshape(batch * leaves, s))
        out = _unfold(out, batch)  # [B, Hq, s * leaves, Dv]
        lse = _unfold(lse[..., None], batch)[..., 0]

        # each level's lower-left quadrants (second-half queries, first-half keys) by the non-causal core
        for level in range(depth):
            segs, half = 2 ** level, s * 2 ** (depth - 1 - level)
            qh = _fold(q.reshape(batch, hq, segs, 2, half, dim)[:, :, :, 1], None)
            kh = _fold(k.reshape(batch, hkv, segs, 2, half, dim)[:, :, :, 0], None)
            vh = _fold(v.reshape(batch, hkv, segs, 2, half, dv)[:, :, :, 0], None)
            qv = None if valid is None else valid.reshape(batch, segs, 2, half)[:, :, 1].reshape(-1, half)
            kv = None if key_valid is None else key_valid.reshape(batch, segs, 2, half)[:, :, 0].reshape(-1, half)
            o_c, l_c = self.core(qh, kh, vh, qv, kv)
            o_c = o_c.view(batch, segs, hq, half, dv).transpose(1, 2)
            l_c = l_c.view(batch, segs, hq, half).transpose(1, 2)
            o_view = out.view(batch, hq, segs, 2, half, dv)[:, :, :, 1]
            l_view = lse.view(batch, hq, segs, 2, half)[:, :, :, 1]
            merged_o, merged_l = _merge(o_view, l_view, o_c, l_c)
            o_view.copy_(merged_o)
            l_view.copy_(merged_l)
        return out[:, :, :n], lse[:, :, :n]


# ------------------------------------------------------------------------------------------------ helpers
def _merge(out_a, lse_a, out_b, lse_b):
    from ..ops import merge_attention

    return merge_attention(out_a, lse_a, out_b, lse_b)


def _fold(x: Tensor, parts: int | None) -> Tensor:
    """``[B, H, parts*s, D] -> [B*parts, H, s, D]``; with ``parts=None`` ``[B, H, P, s, D] -> [B*P, H, s, D]``."""
    if parts is not None:
        x = x.reshape(x.shape[0], x.shape[1], parts, x.shape[2] // parts, x.shape[3])
    batch, heads, segs, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch * segs, heads, length, dim)


def _unfold(x: Tensor, batch: int) -> Tensor:
    """``[B*P, H, s, D] -> [B, H, P*s, D]`` (contiguous)."""
    bp, heads, length, dim = x.shape
    return x.view(batch, bp // batch, heads, length, dim).transpose(1, 2).reshape(batch, heads, -1, dim)


def _diagonal_map(qb: int, bq: int, bk: int, nq_real: Tensor, nk_real: Tensor) -> Tensor:
    """``[B, Qb]`` long: the key block of each sorted query block, matching quantiles of the real tokens (query
    block ``i`` -> key block ``i`` for equal counts, nothing padded and ``bq == bk``)."""
    r = torch.arange(qb, device=nq_real.device, dtype=torch.float64)
    nq_r = nq_real.double()[:, None]
    nk_r = nk_real.double()[:, None]
    start = r * bq
    end = torch.minimum((r + 1) * bq, nq_r).clamp(min=start + 1)
    quantile = (start + end) / 2 / nq_r.clamp(min=1)
    last = (torch.ceil(nk_r / bk) - 1).clamp(min=0)
    return torch.minimum(torch.floor(quantile * nk_r / bk), last).clamp(min=0).long()


def _counts(valid: Tensor | None, batch: int, n: int, device) -> Tensor:
    if valid is None:
        return torch.full((batch,), n, dtype=torch.long, device=device)
    return valid.sum(-1)


def _gray_rank(bits: int) -> Tensor:
    """``[2**bits]``: position of each bucket (sign pattern) in the reflected Gray-code sequence."""
    code = torch.arange(2 ** bits)
    rank = code.clone()
    shift = code >> 1
    while bool(shift.any()):
        rank ^= shift
        shift >>= 1
    return rank


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _causal_tiles(lq: int, lk: int) -> int:
    """Causally visible ``128 x 128`` tiles of ``(lq, lk)`` (queries the last ``lq`` positions)."""
    last = last_visible_block(lq, lk, _TILE, _TILE)
    return int((last + 1).clamp(max=_cdiv(lk, _TILE)).sum())


def _check_inputs(q, k, v, key_padding_mask, causal=True):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"hyper: {name} must be a 4-D tensor [B, H, L, D], got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"hyper: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"hyper: the number of query heads ({q.shape[1]}) must be a multiple of the key/value "
                         f"heads ({k.shape[1]})")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"hyper: q has more positions ({q.shape[2]}) than k ({k.shape[2]}): queries must be the "
                         "last Lq positions of the keys")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError("hyper: q and k need at least one position")
    if key_padding_mask is not None and (not isinstance(key_padding_mask, Tensor)
                                         or key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2])):
        raise ValueError(f"hyper: key_padding_mask must be a bool tensor [B, Lk] = {(k.shape[0], k.shape[2])}")


__all__ = ["Hyper"]
