"""Plain-PyTorch block-sparse attention: the reference every fast path is tested against.

It visits the selected key blocks of a few query blocks and a few heads at a time, so memory grows linearly
with length (never a full ``Lq x Lk`` score matrix) and it runs anywhere PyTorch runs. Softmax in float32
(float64 for float64 inputs). Rows that see no key return zeros and a log-sum-exp of ``-inf``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..pattern import BlockPattern

# Elements of the largest per-chunk intermediate (scores or gathered keys); ~256 MB in float32.
_CHUNK_ELEMENTS = 1 << 26


def pattern_head_map(pattern: BlockPattern, num_q_heads: int, num_kv_heads: int, device) -> Tensor:
    """For each query head, the pattern head it reads (patterns may be per query head, per KV head or shared)."""
    h = torch.arange(num_q_heads, device=device)
    if pattern.heads == 1:
        return torch.zeros_like(h)
    if pattern.heads == num_q_heads:
        return h
    return h // (num_q_heads // num_kv_heads)


def block_sparse_attention_naive(q: Tensor, k: Tensor, v: Tensor, pattern: BlockPattern, *, causal: bool,
                                 scale: float, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    batch, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    bq, bk = pattern.block_q, pattern.block_k
    offset = lk - lq
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device

    head_map = pattern_head_map(pattern, hq, hkv, dev)
    num = pattern.kv_num_blocks.to(dev)[:, head_map].expand(batch, hq, -1)
    idx = pattern.kv_indices.to(dev)[:, head_map].expand(batch, hq, *pattern.kv_indices.shape[2:])
    k_flat = k.reshape(batch * hkv * lk, -1)
    v_flat = v.reshape(batch * hkv * lk, -1)
    kv_base = ((torch.arange(batch, device=dev)[:, None] * hkv + torch.arange(hq, device=dev)[None] // group)
               * lk)[:, :, None, None]  # [B, Hq, 1, 1]

    out = torch.zeros(batch, hq, lq, v.shape[-1], dtype=q.dtype, device=dev)
    lse = torch.full((batch, hq, lq), float("-inf"), dtype=torch.float32, device=dev)
    qb = pattern.num_q_blocks
    width = max(int(num.max()) if num.numel() else 0, 1) * bk
    per_head_row = batch * width * max(bq, q.shape[-1], v.shape[-1])
    heads_per_step = max(1, min(hq, _CHUNK_ELEMENTS // per_head_row))
    rows_per_step = max(1, min(qb, _CHUNK_ELEMENTS // (per_head_row * heads_per_step)))

    for h0 in range(0, hq, heads_per_step):
        hs = slice(h0, min(h0 + heads_per_step, hq))
        for r0 in range(0, qb, rows_per_step):
            r1 = min(r0 + rows_per_step, qb)
            o, l = _chunk(q, k_flat, v_flat, kv_base[:, hs], num[:, hs, r0:r1], idx[:, hs, r0:r1], pattern,
                          hs, r0, r1, causal, scale, key_padding_mask, offset, acc)
            q0, q1 = r0 * bq, min(r1 * bq, lq)
            out[:, hs, q0:q1] = o[:, :, : q1 - q0].to(q.dtype)
            lse[:, hs, q0:q1] = l[:, :, : q1 - q0].float()
    return out, lse


def _chunk(q, k_flat, v_flat, kv_base, num, idx, pattern, hs, r0, r1, causal, scale, pad, offset, acc):
    bq, bk = pattern.block_q, pattern.block_k
    lq, lk = q.shape[2], pattern.kv_len
    dev = q.device
    rows = r1 - r0
    width = max(int(num.max()), 1)
    in_use = torch.arange(width, device=dev) < num[..., None]
    blocks = torch.where(in_use, idx[..., :width].long(), 0)  # [B, h, R, W]; entries past num may hold anything
    k_pos = (blocks[..., None] * bk + torch.arange(bk, device=dev)).flatten(-2)  # [B, h, R, W*bk]
    ok = in_use[..., None].expand(*in_use.shape, bk).flatten(-2) & (k_pos < lk)
    k_pos = k_pos.clamp(max=lk - 1)
    flat = (kv_base + k_pos).flatten(2)  # [B, h, R*T]
    keys = k_flat[flat].view(*k_pos.shape, -1).to(acc)
    vals = v_flat[flat].view(*k_pos.shape, -1).to(acc)

    q_idx = torch.arange(r0 * bq, r1 * bq, device=dev)
    q_pos = (q_idx + offset).view(rows, bq)  # absolute positions [R, bq]
    q_blk = q[:, hs, r0 * bq: min(r1 * bq, lq)].to(acc)
    if q_blk.shape[2] < rows * bq:  # pad the last query block
        q_blk = torch.nn.functional.pad(q_blk, (0, 0, 0, rows * bq - q_blk.shape[2]))
    q_blk = q_blk.view(q_blk.shape[0], q_blk.shape[1], rows, bq, -1)

    scores = torch.einsum("bhrqd,bhrtd->bhrqt", q_blk, keys) * scale
    mask = ok[..., None, :]  # [B, h, R, 1, T]
    kp = k_pos[..., None, :]
    qp = q_pos[None, None, :, :, None]
    if causal:
        mask = mask & (kp <= qp)
    if pad is not None:
        b = torch.arange(pad.shape[0], device=dev)[:, None, None, None]
        mask = mask & pad[b, k_pos][..., None, :]
    if pattern.token_mask is not None:
        mask = mask & pattern.token_mask(qp, kp)
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)
    denom = probs.sum(-1, keepdim=True)
    o = torch.einsum("bhrqt,bhrtd->bhrqd", probs, vals)
    o = torch.where(denom > 0, o / denom.clamp(min=torch.finfo(acc).tiny), torch.zeros_like(o))
    lse = (row_max + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows
    return o.flatten(2, 3), lse.flatten(2, 3)
