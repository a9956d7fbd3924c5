"""LongHeads: every attention head reads its own few chunks of the context, chosen by a chunk key.

Lu et al., "LongHeads: Multi-Head Attention is Secretly a Long Context Processor" (2024; LuLuLuyi/LongHeads).
The context is cut into chunks of ``window_size`` tokens (256). Each chunk gets one key per head, an
attention-weighted average of its keys. A query scores the chunks with its head's query and attends to
``atten_length / window_size`` chunks (16 at the defaults): the first chunk, the previous and the current
chunk, and the best-scoring others. Queries before ``begin_selective_length`` use full attention. Defaults
are the paper's: ``window_size = 256``, ``atten_length = 4096``, ``begin_selective_length = 4096``.

Mapping onto sparsa (``block x block`` tiles, ``block`` default 128, ``window_size`` a multiple of it):

- Selection is per *query block* and per *query head*, not per query token: a query block scores each chunk
  by the max, over ``query_samples`` evenly spaced queries of the block (its last query included), of
  ``q . chunk_key`` -- a chunk that some query of the block ranks high is kept; a selected chunk is its
  ``window_size / block`` key blocks. ``block = 128``: the paper chooses per token, and 64 would stay closer to
  it, but FlexAttention runs 64-token sparse tiles at about half its dense efficiency; on the H200 at the same
  density 128 made the call 1.8-2.4x faster (32K: 6.2 against 13.2 ms, 4.0x against 1.85x SDPA flash; 128K:
  13.7x against 5.6x) and kept 99.4% of dense on ref-small stage 6 (NIAH family and vt, 8K-32K) against 99.8%
  with 64 (BENCHMARKS.md, session 6).
- "Current chunk": the chunks of the block's first and last query (they differ only when the block straddles
  a chunk boundary, e.g. in chunked prefill at an unaligned offset); the one before the first query's chunk is
  "previous". All of them are forced, and the budget of top chunks shrinks by the number forced.
- ``begin_selective_length``: a query block whose first query lies before it is computed dense (causal).

GQA: one pattern per *query head*. LongHeads' claim is that heads choose different chunks, so that together
they cover a long context; reducing a group to one pattern would undo that. Chunk keys are computed once per
KV head (from K only, never repeated) and scored by each query head of the group.

Deviations from the paper, stated plainly:

- **Positions**: the paper concatenates the selected chunks and re-applies RoPE with compact positions
  ``0 .. L-1`` (the query at ``(n - 1) * w + i mod w``), which is what lets it extend the context beyond the
  pretraining length. sparsa's kernels receive q and k *after* RoPE, so this implementation keeps the original
  positions: it is a sparse-attention method within the model's context length, not a context extension.
- **Chunk key**: the paper's chunk summary query is the mean of the chunk's attention outputs under a
  chunk-local attention with chunk-local RoPE positions. That needs the chunk's queries (absent for prefix KV
  in chunked prefill) and a ``w x w`` attention per chunk. Here the summary query is the mean of the chunk's
  keys (``O(L d)``), and the chunk key is, as in the paper, ``sum_j softmax(summary . k_j / sqrt(d)) k_j``: it
  leans toward the keys that agree with the chunk's dominant direction and away from outliers.
- Per query block rather than per query (above); estimation is plain PyTorch, batched over batch, heads and
  query blocks, with memory ``O(Lk d)`` plus ``[Qb, Lk / window_size]`` score maps per head (per sampled query
  too, in slices of query blocks of at most 256 MiB: one matmul per slice rather than one per sample, since on the
  GPU each launch costs more than its arithmetic).

Chunk scoring (``scoring``):

- ``"pooled"`` (the paper's choice): the attention-pooled chunk key above, scored by ``q . chunk_key``.
- ``"bound"`` (the default): a chunk scores the max, over its ``window_size / block`` pieces of ``block`` tokens, of
  the piece's Quest upper bound (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
  ICML 2024), ``sum_d max(q_d kmax_d, q_d kmin_d)`` with ``kmax`` / ``kmin`` the elementwise max / min of the piece's
  keys; per query head, max over the sampled queries as above. Why: the pooled chunk key leans, by design, away from
  outlier keys, so a "needle" (a single key that one query needs, e.g. a variable's definition line) is pooled out of
  its chunk; a bound raises its piece's score wherever it sits. One bound over the whole chunk is too loose (a needle
  must beat 255 neighbours' extremes rather than 63). Evidence so far is a CPU study on the reference model only
  (variable tracking, each line needing one earlier ~20-token definition line): at the same density, vt rose from 0.82
  to 0.98 in a 32K-like setting; on a 32K prompt one bound per 256-token chunk missed 552 needed blocks against 4 for
  the per-block max. On the GPU benchmark (ref-small stage 5, the NIAH family and vt at 8K-32K, 20 samples per cell,
  same samples and same density 0.23 at 32K; BENCHMARKS.md, session 5) the bound kept 100.2% of dense against 98.1%
  for the pooled key (vt at 16K: 1.00 against 0.83; the NIAH part is an upper bound, measured before the prompts
  ended with the answer's leading space), so it is the default. Cost: the sampled queries against every
  piece's ``[kmax; kmin]``, one matmul over the doubled head dim ``[relu(q), min(q, 0)] @ [kmax; kmin]`` (bf16 on the
  GPU, float32 on the CPU) in slices of query blocks of at most ~2^26 scores, so memory stays linear in length. It is
  8 times the pooled scoring's arithmetic (``window_size / block`` pieces per chunk, a doubled head dim): about 1.1
  TFLOP per layer at 128K tokens (32 query heads, D = 128, 16 samples), quadratic in length. Timed on the H200
  (32 / 8 heads, D = 128): 2.9 ms at 32K and 29 ms at 128K, against 1.8 and 11 ms for the pooled key, so
  longheads ran at 1.85x / 5.7x SDPA flash instead of 2.0x / 7.7x (BENCHMARKS.md, session 5).

Padding (``key_padding_mask [B, Lk]``, True = real token, e.g. left padding in a batch): the summary query and
the chunk key use the chunk's real keys only, padded sampled queries do not score, and chunks made only of
padding are never chosen by score. The forced chunks (first, previous, current) and the dense rows before
``begin_selective_length`` stay as they are, with positions counted in the padded sequence (the kernel masks
padded keys); the pattern becomes one per sequence. A chunk without padding keeps exactly its unpadded chunk
key, so an unpadded sequence gets its unpadded pattern. With ``scoring="bound"`` the bounds take real keys only,
a piece made only of padding takes no part in its chunk's max, and padded sampled queries do not score; a chunk
without padding keeps exactly its unpadded bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.chunk_blocks import chunk_blocks
from ..pattern import BlockPattern
from ..registry import register
from .base import Selector, check_block, check_int, check_samples
from .estimate import sample_rows, sampled_bounds

SCORINGS = ("pooled", "bound")


@register("prefill", "longheads")
@dataclass
class LongHeads(Selector):
    #: chunk length in tokens (the paper's ``w``); a multiple of ``block``
    window_size: int = 256
    #: tokens each query attends to, in whole chunks (a multiple of ``window_size``)
    atten_length: int = 4096
    #: queries before this position use full attention
    begin_selective_length: int = 4096
    block: int = 128
    # Dense SDPA below this key length, where torch's fastest SDPA (cuDNN) still wins. Estimation included (Quest
    # bounds and the chunk selection in Triton), attention in sparsa's Triton kernel, against SDPA flash / cuDNN at
    # the defaults: 1.53-1.55x / 0.78x at 8K, 2.28x / 1.22x at 16K (session 7), 4.8x at 32K, 17.7x at 128K (eager;
    # BENCHMARKS.md, session 8).
    dense_below: int = 16384
    #: queries per query block whose max scores a chunk (evenly spaced, the block's last query included)
    query_samples: int = 16
    #: ``"bound"`` (the default: the max over the chunk's ``block``-sized pieces of their Quest upper bound) or
    #: ``"pooled"`` (the paper's attention-pooled chunk key); see the module docstring
    scoring: str = "bound"

    def __post_init__(self):
        super().__post_init__()
        check_block(self)
        check_int(self, "window_size")
        if self.window_size % self.block:
            raise ValueError(f"{self.name}: window_size must be a multiple of block ({self.block}), "
                             f"got {self.window_size}")
        check_int(self, "atten_length")
        if self.atten_length % self.window_size:
            raise ValueError(f"{self.name}: atten_length must be a multiple of window_size ({self.window_size}), "
                             f"got {self.atten_length}")
        check_int(self, "begin_selective_length", minimum=0)
        check_samples(self)
        if self.scoring not in SCORINGS:
            raise ValueError(f"{self.name}: scoring must be one of {SCORINGS}, got {self.scoring!r}")

    def select(self, q: Tensor, k: Tensor, *, layer_idx=None, key_padding_mask=None) -> BlockPattern:
        batch, hq, lq, dim = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        if hkv == 0 or hq % hkv:
            raise ValueError(f"{self.name}: query heads ({hq}) must be a multiple of key/value heads ({hkv})")
        if lq > lk:
            raise ValueError(f"{self.name}: q has more positions ({lq}) than k ({lk})")
        bs, w, dev = self.block, self.window_size, q.device
        per = w // bs
        qb, off = -(-lq // bs), lk - lq
        begin = self.begin_selective_length
        if (qb - 1) * bs + off < begin:  # every query block starts before begin_selective_length: dense
            return BlockPattern.dense(lq, lk, block_q=bs, device=dev)

        # Forced: chunk 0, the previous..current chunks and, for rows before begin_selective_length, every
        # causally visible block; then the best-scoring candidate chunks: one Triton launch on CUDA
        # (sparsa.ops.chunk_blocks; about twenty small PyTorch ops otherwise).
        n_chunks = lk // w
        if n_chunks:
            scores = self._chunk_scores(q, k, n_chunks, key_padding_mask)  # [B, Hq, Qb, n_chunks]
        else:
            scores = q.new_empty(batch, hq, qb, n_chunks, dtype=torch.float32)
        num, idx = chunk_blocks(scores, q_len=lq, kv_len=lk, block=bs, per=per, total=self.atten_length // w,
                                begin=begin)
        return BlockPattern(num, idx, bs, bs, lq, lk)

    def _chunk_scores(self, q: Tensor, k: Tensor, n_chunks: int, key_padding_mask: Tensor | None = None) -> Tensor:
        """``[B, Hq, Qb, n_chunks]``: per query head and block, max over sampled queries of ``q . chunk_key``.

        With ``key_padding_mask [B, Lk]`` (True = real token) the chunk key is built from real keys only, padded
        sampled queries do not score, and chunks made only of padding score ``-inf``.
        """
        batch, hq, lq, dim = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        if self.scoring == "bound":
            return self._bound_chunk_scores(q, k, n_chunks, key_padding_mask)
        w, bs, samples = self.window_size, self.block, self.query_samples
        kc = k[:, :, : n_chunks * w].reshape(batch, hkv, n_chunks, w, dim)
        summary = kc.mean(3, dtype=torch.float32)  # [B, Hkv, C, D]: the chunk's summary query
        if key_padding_mask is not None:
            real = key_padding_mask.to(device=k.device, dtype=torch.bool)
            real_c = real[:, : n_chunks * w].reshape(batch, 1, n_chunks, w)
            count = real_c.sum(-1)  # [B, 1, C]
            real_sum = kc.masked_fill(~real_c[..., None], 0).sum(3, dtype=torch.float32)
            # a chunk without padding keeps exactly the unmasked mean
            summary = torch.where((count == w)[..., None], summary, real_sum / count.clamp(min=1)[..., None])
        logits = torch.einsum("bhcwd,bhcd->bhcw", kc, summary.to(kc.dtype)).float() * dim ** -0.5
        if key_padding_mask is not None:  # chunks made only of padding keep finite weights; they score -inf below
            logits = logits.masked_fill(~real_c & (count > 0)[..., None], float("-inf"))
        weights = torch.softmax(logits, -1)
        chunk_key = torch.einsum("bhcw,bhcwd->bhcd", weights.to(kc.dtype), kc).float()  # [B, Hkv, C, D]

        rows = sample_rows(lq, bs, samples, q.device)  # [Qb, S]
        qb = rows.shape[0]
        rep = q.index_select(2, rows.flatten()).view(batch, hkv, hq // hkv, qb, samples, dim)
        q_real = None
        if key_padding_mask is not None:
            q_real = real[:, rows + (lk - lq)][:, None, None, :, :, None]  # [B, 1, 1, Qb, S, 1]
        best = _max_over_samples(rep, chunk_key, q_real)
        if key_padding_mask is not None:
            best = best.masked_fill((count == 0)[:, :, None, None], float("-inf"))  # [B, 1, 1, 1, C]
        return best.reshape(batch, hq, qb, n_chunks)

    def _bound_chunk_scores(self, q: Tensor, k: Tensor, n_chunks: int,
                            key_padding_mask: Tensor | None = None) -> Tensor:
        """``[B, Hq, Qb, n_chunks]`` float32 (``scoring="bound"``): per query head and block, the max over sampled
        queries and over the chunk's ``block``-sized pieces of the pieces' Quest bound.

        With ``key_padding_mask [B, Lk]`` (True = real token) the bounds take real keys only, a piece made only of
        padding takes no part in its chunk's max (a chunk of padding only scores ``-inf``) and padded sampled
        queries do not score.
        """
        w = self.window_size
        real = None if key_padding_mask is None else key_padding_mask.to(device=k.device, dtype=torch.bool)
        return sampled_bounds(q, k[:, :, : n_chunks * w], self.block, self.query_samples,  # whole chunks only
                              key_real=None if real is None else real[:, : n_chunks * w],
                              query_real=None if real is None else real[:, k.shape[2] - q.shape[2]:],
                              per_head=True, pieces=w // self.block, max_elements=_BOUND_SLICE_ELEMENTS)


# Largest float32 intermediate of the sample scoring, in bytes: at 128K tokens (32 query heads, 512 chunks) the
# scores of all query blocks' samples would take 2 GB, so they are computed a slice of query blocks at a time.
_SLICE_BYTES = 256 << 20
# Largest ``[.., S, pieces]`` bound intermediate of ``scoring="bound"``, in elements (bf16 on the GPU: 128 MiB).
_BOUND_SLICE_ELEMENTS = 1 << 26


def _max_over_samples(rep: Tensor, chunk_key: Tensor, q_real: Tensor | None) -> Tensor:
    """``[B, Hkv, G, Qb, C]``: the max over sampled queries ``rep [B, Hkv, G, Qb, S, D]`` of ``q . chunk_key``
    (``[B, Hkv, C, D]`` float32), in float32, leaving out padded samples (``q_real [B, 1, 1, Qb, S, 1]`` False).
    One matmul per slice of query blocks, each slice within ``_SLICE_BYTES``."""
    batch, hkv, group, qb, samples, dim = rep.shape
    n_chunks = chunk_key.shape[2]
    step = max(1, _SLICE_BYTES // (batch * hkv * group * samples * max(dim, n_chunks) * 4))
    parts = []
    for r in range(0, qb, step):
        part = rep[:, :, :, r:r + step].float()  # [B, Hkv, G, R, S, D]
        sc = torch.matmul(part.flatten(2, 4), chunk_key.transpose(-1, -2)).view(*part.shape[:-1], n_chunks)
        if q_real is not None:
            sc = torch.where(q_real[:, :, :, r:r + step], sc, float("-inf"))
        parts.append(sc.amax(-2))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 3)
