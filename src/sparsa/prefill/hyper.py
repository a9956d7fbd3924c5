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
  at its end, giving the same segment sizes up to where the pad rows sit). The diagonal leaves are one causal
  kernel call with the leaves folded into the batch; each level's ``2**l`` lower-left quadrants are one call
  of the core with the segments as a batch dimension. The deepest levels whose quadrants are exact (too short
  for the core) are run as part of larger leaves: a causal leaf of ``2s`` is two leaves of ``s`` and their
  quadrant. Pad rows are masked out.
- Tokens are hashed once per call (a token's bucket is the same at every level); each level sorts its rows.
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
- The sampled part is computed in row slices whose scores stay within 256 MiB.
- Randomness: hyperplanes and samples come from a generator seeded by ``seed`` and the layer index, so a run
  is reproducible and layers use different hyperplanes (the official code has one LSH module per layer).
- Launch overhead: on the GPU the method is bound by kernel launches up to ~32K tokens (~27 us per ATen op on
  the H200). The random draws depend only on the seed, the layer and the shapes: they are drawn on the host
  once and cached on the device (``sparsa._shapes``), as are the Gray-code table and, without padding, the
  block-diagonal patterns (so the kernel's BlockMask is built once) and the sample positions; a warm call copies
  nothing from the host. ATen ops per call at 32K (B=1, 32/8 heads, kernels excluded): 763 before, 197 after
  (``tests/test_hyper_overhead.py``).

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

Which layers: the paper patches only the final layers of its LLM (ChatGLM2-6B-32k) and reports quality falling
as more layers are patched; by default sparsa applies the method to every layer, and ``dense_layers`` keeps the
first ones dense. Measured on ref-small stage 6 (H200, NIAH family and vt at 8K-32K, 20 samples per cell;
BENCHMARKS.md, session 6): every layer 82.2% of dense (single needle 0.35 at 32K); its first layer dense
(``dense_layers=[0]``) 84.5%; its first three of six dense (``[0,1,2]``) 98.4%, every NIAH cell recovered, vt at
32K 84%, at density 0.64 at 32K (the dense layers count in it). LSH buckets and sampled columns approximate
the bulk of attention, not the one key a retrieval head needs, and this model retrieves in its early layers.

``select`` raises ``NotImplementedError``: the computation is not one block pattern (the sorted order differs
per head and level, and the sampled part is not tile-aligned).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._shapes import device_key, shape_constant
from ..pattern import BlockPattern, arange
from ..registry import register
from .base import Selector, check_block, check_int

_TILE = 128  # density unit: 128 x 128 tiles, as sparsa.stats weighs layers
_MAX_PROJS = 16
_MIN_QUERY_BLOCK = 16
_SAMPLE_BYTES = 256 << 20  # the sampled part's scores are computed in row slices of at most this size


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

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                key_padding_mask: Tensor | None = None, backend: str = "auto",
                layer_idx: int | None = None) -> tuple[Tensor, float]:
        """Causal HyperAttention: ``(out [B, Hq, Lq, Dv], density)``; queries are the last ``Lq`` positions."""
        from ..ops import block_sparse_attention

        _check_inputs(q, k, v, key_padding_mask)
        batch, _, lq, dim = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        scale = dim ** -0.5 if scale is None else scale
        if lk <= self.min_seq_len:
            out = block_sparse_attention(q, k, v, _dense_pattern(lq, lk, True, q.device), causal=True, scale=scale,
                                         key_padding_mask=key_padding_mask, backend=backend, validate=False)
            return out, 1.0
        prefix = lk - lq
        # the non-causal cores in the order they run: the levels of the causal square, then the prefix
        cores = [(batch * segs, hkv, half, half) for segs, half in _recursion(lq, self).levels]
        if prefix:
            cores.append((batch, hkv, lq, prefix))
        run = _Run(self, q, scale, backend, layer_idx, cores=cores)
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
        cores = [(q.shape[0], k.shape[1], q.shape[2], k.shape[2])]
        run = _Run(self, q, scale, backend, layer_idx, cores=cores)
        out, lse = run.core(q, k, v, None, key_padding_mask)
        return out.to(q.dtype), lse


@dataclass(frozen=True)
class _Recursion:
    """The unrolled recursion over ``n`` rows: ``2**depth`` leaves of ``s`` rows (``n`` padded to ``s * 2**depth``);
    ``levels``: ``(segments, half length)`` of the levels the core approximates, top down. The levels below
    them are exact: they run inside larger leaves (``2**len(levels)`` of them)."""

    s: int
    depth: int
    levels: tuple


def _recursion(n: int, cfg: Hyper) -> _Recursion:
    depth = 0
    while _cdiv(n, 2 ** depth) > cfg.min_seq_len:
        depth += 1
    s = _cdiv(n, 2 ** depth)
    levels = [(2 ** level, s * 2 ** (depth - 1 - level)) for level in range(depth)]
    # Halves shrink down the levels, so the exact ones are the last ones.
    return _Recursion(s, depth, tuple((segs, half) for segs, half in levels if _approximated(cfg, half, half)))


def _approximated(cfg: Hyper, nq: int, nk: int) -> bool:
    """Whether the non-causal core of ``nq`` queries over ``nk`` keys is approximated (else it is exact)."""
    return nq >= cfg.min_seq_len and nk > cfg.block_size


class _Run:
    """One attention call: the random state, the hyperplanes and the work counter.

    ``cores``: ``(batch, kv heads, nq, nk)`` of each non-causal core the call runs, in order. The generator
    gives the hyperplanes, then the uniform draws of each sampled core in that order: all of it depends only on
    the seed, the layer and these shapes, so it is drawn once and kept on the device."""

    def __init__(self, cfg: Hyper, q: Tensor, scale: float, backend: str, layer_idx, *, cores=()):
        self.cfg = cfg
        self.scale = float(scale)
        self.backend = backend
        self.device = q.device
        self.acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        layer = -1 if layer_idx is None else int(layer_idx)
        seed = (cfg.seed * 1_000_003 + layer + 1) % (1 << 63)
        dim, projs, dev = q.shape[-1], cfg.lsh_num_projs, device_key(q.device)
        self.proj = shape_constant(("hyper_proj", seed, dim, projs, q.dtype, dev),
                                   lambda: _hyperplanes(_generator(seed), dim, projs).to(q.device, q.dtype))
        self.pow2 = shape_constant(("hyper_pow2", projs, dev), lambda: 2 ** torch.arange(projs, device=q.device))
        self.rank = shape_constant(("hyper_gray_rank", projs, dev), lambda: _gray_rank(projs).to(q.device))
        sampled = [(b, h, nk) for b, h, nq, nk in cores if cfg.sample_size and _approximated(cfg, nq, nk)]
        self.draws = iter(_sample_draws(seed, dim, projs, sampled, cfg.sample_size, q.device))
        self.work = 0.0  # computed 128x128 tile-equivalents, summed over the (folded) batch

    # --------------------------------------------------------------------------------------- kernels
    def kernel(self, q, k, v, pattern, *, causal, key_valid):
        """:func:`sparsa.ops.block_sparse_attention` with the lse, in the accumulation dtype. Non-causal calls
        may have more queries than keys (the prefix part): the keys are then zero-padded to the query count,
        the pad masked, and the pattern keeps to the real key blocks (no tile of pad keys is computed)."""
        from ..ops import block_sparse_attention

        batch, _, nq, _ = q.shape
        nk = k.shape[2]
        if pattern is None:
            pattern = _dense_pattern(nq, nk, causal, q.device)
        if nq > nk:
            extra = nq - nk
            k, v = F.pad(k, (0, 0, 0, extra)), F.pad(v, (0, 0, 0, extra))
            real = torch.ones(batch, nk, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
            key_valid = torch.cat([real, torch.zeros(batch, extra, dtype=torch.bool, device=q.device)], 1)
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
        rank = self.rank[(bits * self.pow2).sum(-1)]
        if valid is not None:
            rank = torch.where(valid[:, None, :], rank, self.rank.numel())
        return rank

    # ------------------------------------------------------------------------------------------ core
    def core(self, q, k, v, q_valid, k_valid):
        """Non-causal HyperAttention of ``q [B, Hq, nq, D]`` over ``k, v [B, Hkv, nk, D]``: ``(out, lse)`` in the
        accumulation dtype. ``q_valid [B, nq]`` / ``k_valid [B, nk]``: real tokens (None: all)."""
        if not _approximated(self.cfg, q.shape[2], k.shape[2]):
            return self.exact(q, k, v, causal=False, key_valid=k_valid)
        q_real = None if q_valid is None else q_valid.sum(-1)
        k_real = None if k_valid is None else k_valid.sum(-1)
        return self.approximate(q[:, None], k[:, None], v[:, None], self.hash(q, q_valid)[:, None],
                                self.hash(k, k_valid)[:, None], q_real, k_real)

    def approximate(self, q, k, v, q_rank, k_rank, q_real, k_real):
        """The approximated core over ``S`` segments at once: ``q [B, S, Hq, nq, D]`` over ``k, v [B, S, Hkv, nk,
        D]`` (views), with bucket ranks ``q_rank [B, S, Hq, nq]``, ``k_rank [B, S, Hkv, nk]``; ``q_real`` /
        ``k_real [B*S]``: real tokens per segment (None: all). ``(out [B*S, Hq, nq, Dv], lse)``, rows in order."""
        cfg = self.cfg
        batch, segs, _, nq, _ = q.shape
        nk = k.shape[3]
        folded = batch * segs

        # 1. sortLSH
        q_idx = torch.argsort(q_rank, dim=-1, stable=True)
        k_idx = torch.argsort(k_rank, dim=-1, stable=True)
        qs, ks, vs = _sorted(q, q_idx), _sorted(k, k_idx), _sorted(v, k_idx)

        # 2. block-diagonal attention in sorted order
        bk = cfg.block_size
        bq = bk
        while bq > _MIN_QUERY_BLOCK and _cdiv(nq, bq) < _cdiv(nk, bk):
            bq //= 2
        pattern, row_block = self.block_diagonal(folded, nq, nk, bq, q_real, k_real)
        key_pad = None if k_real is None else arange(nk, self.device) < k_real[:, None]
        out, lse = self.kernel(qs, ks, vs, pattern, causal=False, key_valid=key_pad)
        self.work += folded * nq * bk / _TILE ** 2

        # 3. uniformly sampled keys, minus those in the query's own diagonal block
        if cfg.sample_size > 0:
            out_s, lse_s = self.sampled(qs, ks, vs, row_block, k_real)
            out, lse = _merge(out, lse, out_s, lse_s)
            self.work += folded * nq * cfg.sample_size / _TILE ** 2

        # 4. back to the original row order
        out, lse = out.view(*q_idx.shape, -1), lse.view(q_idx.shape)
        out = torch.empty_like(out).scatter_(3, q_idx[..., None].expand_as(out), out)
        lse = torch.empty_like(lse).scatter_(3, q_idx, lse)
        return out.flatten(0, 1), lse.flatten(0, 1)

    def block_diagonal(self, batch, nq, nk, bq, q_real, k_real):
        """The block-diagonal pattern in sorted order and the key block of each sorted query row ``[B or 1, nq]``.
        Without padding both are shape-only: cached, so that the kernel's BlockMask is built once."""
        bk, dev = self.cfg.block_size, self.device
        qb = _cdiv(nq, bq)

        def pattern_of(diag):
            ones = shape_constant(("hyper_ones", qb, device_key(dev)),
                                  lambda: torch.ones(1, 1, qb, dtype=torch.int32, device=dev))
            # (kv_len at least nq: with more queries than keys, ``kernel`` pads the keys; no pad block is selected)
            return BlockPattern(ones.expand(diag.shape[0], 1, qb), diag[:, None, :, None].to(torch.int32), bq, bk,
                                nq, max(nq, nk))

        def rows_of(diag):
            return diag[:, arange(nq, dev) // bq]

        if q_real is None and k_real is None:
            key = (nq, nk, bq, bk, device_key(dev))
            diag = shape_constant(("hyper_diagonal", *key),
                                  lambda: _diagonal_map(qb, bq, bk, _full(nq, dev), _full(nk, dev)))
            return (shape_constant(("hyper_diagonal_pattern", *key), lambda: pattern_of(diag)),
                    shape_constant(("hyper_diagonal_rows", *key), lambda: rows_of(diag)))
        nq_real = _full(nq, dev).expand(batch) if q_real is None else q_real
        nk_real = _full(nk, dev).expand(batch) if k_real is None else k_real
        diag = _diagonal_map(qb, bq, bk, nq_real, nk_real)  # [B, Qb] key block of each query block
        return pattern_of(diag), rows_of(diag)

    def sampled(self, qs, ks, vs, row_block, k_real):
        """Attention of the sorted queries ``qs [B, Hq, nq, D]`` over ``sample_size`` keys drawn uniformly from the
        real sorted keys ``ks, vs [B, Hkv, nk, D]`` (per KV head), except those in the query's own diagonal block
        (``row_block [B or 1, nq]``); the lse carries the weight ``n_real / m``."""
        cfg = self.cfg
        batch, hq, nq, dim = qs.shape
        hkv, dv = ks.shape[1], vs.shape[-1]
        group, m = hq // hkv, cfg.sample_size
        pick, log_w = self.samples(k_real)  # [B, Hkv, m]
        at = pick[:, :, None, :, None]
        # the samples repeated for each query head of the group, so the scores are one batched matmul
        k_s = ks[:, :, None].expand(-1, -1, group, -1, -1).gather(3, at.expand(-1, -1, group, -1, dim))
        v_s = vs[:, :, None].expand(-1, -1, group, -1, -1).gather(3, at.expand(-1, -1, group, -1, dv))
        k_s, v_s = k_s.to(self.acc).mul_(self.scale), v_s.to(self.acc)
        # [B, Hkv, 1, nq, m]: the sample lies in the row's diagonal key block
        own = row_block[:, None, None, :, None] == (pick // cfg.block_size)[:, :, None, None, :]
        q5 = qs.view(batch, hkv, group, nq, dim)
        step = max(1, _SAMPLE_BYTES // (batch * hq * m * k_s.element_size()))
        parts = [_attend_samples(q5[:, :, :, r:r + step].to(self.acc), k_s, v_s, own[:, :, :, r:r + step])
                 for r in range(0, nq, step)]
        out, lse = parts[0] if len(parts) == 1 else (torch.cat(p, 3) for p in zip(*parts))
        return out.view(batch, hq, nq, dv), (lse + log_w).view(batch, hq, nq)

    def samples(self, k_real):
        """The next core's sample positions among the sorted keys ``[B, Hkv, m]`` and ``log(n_real / m)`` (a float,
        or ``[B, 1, 1, 1]``; no real key at all: -inf, the part is empty)."""
        u, pick, nk = next(self.draws)
        m = self.cfg.sample_size
        if k_real is None:
            return pick, math.log(nk) - math.log(m)
        real = k_real[:, None, None]
        pick = (u * real).long().clamp(max=real.clamp(min=1) - 1)
        return pick, (torch.log(k_real.to(self.acc)) - math.log(m))[:, None, None, None]

    # ---------------------------------------------------------------------------------------- causal
    def causal_square(self, q, k, v, valid, padded):
        """Causal attention of ``q [B, Hq, n, D]`` over the ``n`` keys at the same positions, by the official
        recursion unrolled into levels. ``valid [B, n]``: real tokens (None: all); ``padded``: whether
        ``valid`` holds key padding (else it is None)."""
        batch, hq, n, _ = q.shape
        rec = _recursion(n, self.cfg)
        if rec.depth == 0:
            return self.exact(q, k, v, causal=True, key_valid=valid)
        s, depth = rec.s, rec.depth
        extra = s * 2 ** depth - n
        if extra:
            q, k, v = (F.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
            real = torch.ones(batch, n, dtype=torch.bool, device=self.device) if valid is None else valid
            valid = torch.cat([real, torch.zeros(batch, extra, dtype=torch.bool, device=self.device)], 1)
        # Pad rows sit after every real query, so causal masking hides them in the leaves; as keys of a
        # lower-left quadrant they only appear when they reach into a first half (extra > s).
        key_valid = valid if (padded or extra > s) else None

        # the leaves, exact and causal, folded into the batch (one kernel call); counted as the recursion's
        # leaves of s and its exact quadrants below the approximated levels
        leaves = 2 ** len(rec.levels)
        out, lse = self.kernel(_fold(q, leaves), _fold(k, leaves), _fold(v, leaves), None, causal=True,
                               key_valid=None if key_valid is None else key_valid.reshape(batch * leaves, -1))
        self.work += batch * 2 ** depth * _causal_tiles(s, s)
        for level in range(len(rec.levels), depth):
            self.work += batch * 2 ** level * _cdiv(s * 2 ** (depth - 1 - level), _TILE) ** 2
        out = _unfold(out, batch)  # [B, Hq, s * 2**depth, Dv]
        lse = _unfold(lse[..., None], batch)[..., 0]

        # each level's lower-left quadrants (second-half queries, first-half keys) by the non-causal core
        q_rank, k_rank = self.hash(q, valid), self.hash(k, key_valid)
        for segs, half in rec.levels:
            q_real = None if valid is None else valid.view(batch, segs, 2, half)[:, :, 1].sum(-1).flatten()
            k_real = None if key_valid is None else key_valid.view(batch, segs, 2, half)[:, :, 0].sum(-1).flatten()
            o_c, l_c = self.approximate(_halves(q, segs, 1), _halves(k, segs, 0), _halves(v, segs, 0),
                                        _halves(q_rank, segs, 1), _halves(k_rank, segs, 0), q_real, k_real)
            _merge_into(_halves(out, segs, 1), _halves(lse, segs, 1), o_c.view(batch, segs, hq, half, -1),
                        l_c.view(batch, segs, hq, half))
        return out[:, :, :n], lse[:, :, :n]


# ------------------------------------------------------------------------------------------------ helpers
def _attend_samples(q, k_s, v_s, own):
    """Attention of ``q [B, Hkv, G, r, D]`` over the samples ``k_s [B, Hkv, G, m, D]`` (scaled), ``v_s`` except where
    ``own [B, Hkv, 1, r, m]``: ``(out [B, Hkv, G, r, Dv], lse [B, Hkv, G, r])``. A row with every sample masked
    gives 0 and -inf."""
    scores = torch.matmul(q, k_s.transpose(-1, -2)).masked_fill_(own, float("-inf"))
    top = scores.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)  # -inf where every sample is masked
    probs = scores.sub_(top).exp_()
    total = probs.sum(-1)
    out = torch.matmul(probs, v_s).div_(total.clamp(min=1)[..., None])  # total >= 1 once any sample is seen
    return out, total.log_().add_(top[..., 0])


def _merge(out_a, lse_a, out_b, lse_b):
    """Two attentions over disjoint key sets combined by their log-sum-exps (as :func:`sparsa.ops.merge_attention`,
    in the accumulation dtype and in fewer kernels)."""
    lse = torch.logaddexp(lse_a, lse_b)
    ref = lse.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)  # rows that see no key: 0 and -inf
    w_a, w_b = (lse_a - ref).exp_()[..., None], (lse_b - ref).exp_()[..., None]
    return torch.addcmul(out_a * w_a, out_b, w_b), lse


def _merge_into(out, lse, out_b, lse_b):
    """``_merge`` written into ``out`` and ``lse`` (views)."""
    merged = torch.logaddexp(lse, lse_b)
    ref = merged.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    w_a, w_b = (lse - ref).exp_()[..., None], (lse_b - ref).exp_()[..., None]
    out.mul_(w_a).addcmul_(out_b, w_b)
    lse.copy_(merged)


def _sorted(x: Tensor, idx: Tensor) -> Tensor:
    """Rows of ``x [B, S, H, n, D]`` in the order ``idx [B, S, H, n]``, as ``[B*S, H, n, D]``."""
    return x.gather(3, idx[..., None].expand(*idx.shape, x.shape[-1])).flatten(0, 1)


def _halves(x: Tensor, segs: int, part: int) -> Tensor:
    """``[B, H, n, ...] -> [B, segs, H, n / (2 segs), ...]``: the first (``part=0``) or second (1) half of each
    of ``segs`` equal segments, a view."""
    batch, heads, n = x.shape[:3]
    return x.view(batch, heads, segs, 2, n // (2 * segs), *x.shape[3:])[:, :, :, part].transpose(1, 2)


def _fold(x: Tensor, parts: int) -> Tensor:
    """``[B, H, parts*s, D] -> [B*parts, H, s, D]``."""
    batch, heads, length, dim = x.shape
    return x.view(batch, heads, parts, length // parts, dim).transpose(1, 2).reshape(batch * parts, heads, -1, dim)


def _unfold(x: Tensor, batch: int) -> Tensor:
    """``[B*P, H, s, D] -> [B, H, P*s, D]`` (contiguous)."""
    bp, heads, length, dim = x.shape
    return x.view(batch, bp // batch, heads, length, dim).transpose(1, 2).reshape(batch, heads, -1, dim)


def _dense_pattern(nq: int, nk: int, causal: bool, device) -> BlockPattern:
    """Every tile of the real keys (causal: the visible ones). With more queries than keys (non-causal only)
    ``kernel`` pads the keys to ``nq``: kv_len is ``nq`` and no tile of pad keys is selected. Cached, so that
    the kernel's BlockMask for it is built once."""
    def make():
        if nq <= nk:
            return BlockPattern.dense(nq, nk, causal=causal, device=device)
        qb, kb = _cdiv(nq, _TILE), _cdiv(nk, _TILE)
        idx = arange(kb, device, torch.int32).expand(1, 1, qb, kb)
        return BlockPattern(torch.full((1, 1, qb), kb, dtype=torch.int32, device=device), idx, _TILE, _TILE, nq, nq)

    return shape_constant(("hyper_dense_pattern", nq, nk, causal, device_key(device)), make)


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


def _full(n: int, device) -> Tensor:
    """``[1]`` holding ``n``: a count where every token is real."""
    return torch.full((1,), n, dtype=torch.long, device=device)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hyperplanes(gen: torch.Generator, dim: int, projs: int) -> Tensor:
    return torch.randn(dim, projs, generator=gen)


def _sample_draws(seed: int, dim: int, projs: int, cores: list, m: int, device) -> list:
    """``(u, pick, nk)`` per sampled core ``(batch, kv heads, nk)``, in order: the generator's uniform float64 draws
    ``u [batch, heads, m]`` after the hyperplanes (exactly as drawn one core at a time) and the sample positions
    they give when all ``nk`` keys are real. Made once per seed, layer and shapes, and kept on the device."""
    if not cores:
        return []
    shapes = tuple((b, h, m) for b, h, _ in cores)
    key = ("hyper_draws", seed, dim, projs, shapes, device_key(device))

    def draw():
        gen = _generator(seed)
        _hyperplanes(gen, dim, projs)
        u = [torch.rand(shape, generator=gen, dtype=torch.float64).flatten() for shape in shapes]
        return torch.cat(u).to(device)

    def split(flat):
        sizes = [math.prod(shape) for shape in shapes]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [flat[a:a + n].view(shape) for a, n, shape in zip(starts, sizes, shapes)]

    u = split(shape_constant(key, draw))
    counts = tuple(nk for _, _, nk in cores)
    picks = split(shape_constant((*key, "picks", counts), lambda: torch.cat(
        [(part * nk).long().clamp(max=nk - 1).flatten() for part, nk in zip(u, counts)])))
    return list(zip(u, picks, counts))


def _gray_rank(bits: int) -> Tensor:
    """``[2**bits]``: position of each bucket (sign pattern) in the reflected Gray-code sequence."""
    code = torch.arange(2 ** bits)
    rank = code.clone()
    for shift in range(1, bits):  # the inverse Gray code: the xor of every right shift
        rank ^= code >> shift
    return rank


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=256)
def _causal_tiles(lq: int, lk: int) -> int:
    """Causally visible ``128 x 128`` tiles of ``(lq, lk)`` (queries the last ``lq`` positions); on the host."""
    kb = _cdiv(lk, _TILE)
    return sum(min((min((r + 1) * _TILE, lq) - 1 + lk - lq) // _TILE + 1, kb) for r in range(_cdiv(lq, _TILE)))


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
