"""An independent dense reference: materialise the token-level mask a pattern means, softmax in float64.

Only for small sizes in tests. Written without the kernels' code paths (no gathers, no chunking) and without
the pattern's own conversions (``to_block_mask``): the block map is read entry by entry from
``kv_num_blocks`` / ``kv_indices`` in plain Python.
"""

import torch


def block_map_of(pattern):
    """[Bp, Hp, Qb, Kb] bool read entry by entry from the pattern's index lists (small sizes only)."""
    num = pattern.kv_num_blocks.cpu().tolist()
    idx = pattern.kv_indices.cpu().tolist()
    kb = -(-pattern.kv_len // pattern.block_k)
    bp, hp, qb = len(num), len(num[0]), len(num[0][0])
    out = torch.zeros(bp, hp, qb, kb, dtype=torch.bool)
    for b in range(bp):
        for h in range(hp):
            for r in range(qb):
                for j in range(num[b][h][r]):
                    out[b, h, r, idx[b][h][r][j]] = True
    return out


def block_map_for_heads(pattern, batch, num_q_heads, num_kv_heads):
    """[B, Hq, Qb, Kb] bool: the tiles each (sequence, query head) computes."""
    blocks = block_map_of(pattern)  # [Bp, Hp, Qb, Kb]
    heads = blocks.shape[1]
    # query head h reads pattern head: h (per query head), h // group (per KV head) or 0 (shared)
    if heads == num_q_heads:
        head_of = list(range(num_q_heads))
    elif heads == num_kv_heads:
        head_of = [h // (num_q_heads // num_kv_heads) for h in range(num_q_heads)]
    elif heads == 1:
        head_of = [0] * num_q_heads
    else:
        raise AssertionError(f"pattern heads {heads} fit neither {num_q_heads} nor {num_kv_heads}")
    return blocks[:, head_of].expand(batch, num_q_heads, -1, -1)


def token_mask_of(pattern, batch, num_q_heads, num_kv_heads, causal, key_padding_mask=None):
    """[B, Hq, Lq, Lk] bool: the exact (query, key) pairs a pattern computes."""
    lq, lk = pattern.q_len, pattern.kv_len
    blocks = block_map_for_heads(pattern, batch, num_q_heads, num_kv_heads)
    q_block = torch.arange(lq) // pattern.block_q
    k_block = torch.arange(lk) // pattern.block_k
    m = blocks[:, :, q_block][:, :, :, k_block]
    q_pos = torch.arange(lq)[:, None] + (lk - lq)
    k_pos = torch.arange(lk)[None, :]
    if causal:
        m = m & (k_pos <= q_pos)
    if pattern.token_mask is not None:
        m = m & pattern.token_mask(q_pos, k_pos)
    if key_padding_mask is not None:
        m = m & key_padding_mask[:, None, None, :].cpu()
    return m


def dense_attention(q, k, v, mask, scale=None):
    """Masked softmax attention in float64 on the CPU. Returns (out float64, lse float64, natural log);
    rows with no visible key give 0 / -inf."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    kk = k.double().cpu().repeat_interleave(group, 1)
    vv = v.double().cpu().repeat_interleave(group, 1)
    s = (q.double().cpu() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    out = p @ vv
    return out, lse
