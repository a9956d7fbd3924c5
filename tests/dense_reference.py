"""An independent dense reference: materialise the token-level mask a pattern means, softmax in float64.

Only for small sizes in tests. Written without the kernels' code paths (no gathers, no chunking).
"""

import torch


def token_mask_of(pattern, batch, num_q_heads, num_kv_heads, causal, key_padding_mask=None):
    """[B, Hq, Lq, Lk] bool: the exact (query, key) pairs a pattern computes."""
    lq, lk = pattern.q_len, pattern.kv_len
    blocks = pattern.to_block_mask()  # [Bp, Hp, Qb, Kb]
    heads = pattern.heads
    if heads == num_kv_heads and heads != num_q_heads:
        blocks = blocks.repeat_interleave(num_q_heads // num_kv_heads, dim=1)
    blocks = blocks.expand(batch, num_q_heads, -1, -1)
    m = blocks.repeat_interleave(pattern.block_q, 2).repeat_interleave(pattern.block_k, 3)[:, :, :lq, :lk]
    q_pos = torch.arange(lq)[:, None] + (lk - lq)
    k_pos = torch.arange(lk)[None, :]
    if causal:
        m = m & (k_pos <= q_pos)
    if pattern.token_mask is not None:
        m = m & pattern.token_mask(q_pos, k_pos)
    if key_padding_mask is not None:
        m = m & key_padding_mask[:, None, None, :]
    return m


def dense_attention(q, k, v, mask, scale=None):
    """Masked softmax attention in float64. Returns (out in q.dtype, lse float64); empty rows give 0 / -inf."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    out = p @ vv
    return out, lse
