"""Block-sparse attention through PyTorch FlexAttention (compiled; GPU and CPU).

The ``BlockMask`` is built from the pattern's block indices (never from a token-level evaluation). Tiles that
are fully visible -- below the causal diagonal, free of key padding, inside the token mask -- go to the
"full" lists, where FlexAttention skips the mask function; this is worth ~15% on the GPU for causal masks.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import Tensor

from .._shapes import device_key, shape_constant
from ..pattern import BlockPattern
from .naive import pattern_head_map

_compiled = None
_FROM_KV_ARGS = None
# BlockMasks built for a pattern, reused while the pattern lives: a static pattern is shared by every layer of a
# forward pass, so its mask is built once. Keyed by the pattern object; the value holds the padding tensor
# it was built with, so that tensor's id cannot be reused by another while the entry lives.
_MASKS: "weakref.WeakKeyDictionary[BlockPattern, dict]" = weakref.WeakKeyDictionary()


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flex():
    """One compiled FlexAttention for the process; dynamo caches a graph per shape family, so sweeping lengths
    reuses compiled code (automatic dynamic shapes) instead of recompiling each call."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _compiled = torch.compile(flex_attention, fullgraph=True)
    return _compiled


def _compact(idx: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Move the kept entries of each row to the front, in order (a stable partition by cumulative sum)."""
    width = idx.shape[-1]
    pos = torch.where(keep, keep.cumsum(-1) - 1, width)  # dropped entries go to a spill column
    out = torch.zeros(*idx.shape[:-1], width + 1, dtype=torch.int32, device=idx.device)
    out.scatter_(-1, pos, idx.to(torch.int32))
    return keep.sum(-1, dtype=torch.int32), out[..., :width].contiguous()


def build_block_mask(pattern: BlockPattern, batch: int, num_q_heads: int, num_kv_heads: int, *, causal: bool,
                     key_padding_mask: Tensor | None, device, seq_lengths: tuple[int, int] | None = None):
    """The FlexAttention ``BlockMask`` of a pattern; ``seq_lengths`` are the (padded) lengths the kernel sees."""
    from torch.nn.attention.flex_attention import BlockMask

    bq, bk = pattern.block_q, pattern.block_k
    lq, lk = pattern.q_len, pattern.kv_len
    offset = lk - lq
    num, idx = pattern.kv_num_blocks.to(device), pattern.kv_indices.to(device)
    kv_full = None if pattern.kv_full is None else pattern.kv_full.to(device)
    head_map = None
    if pattern.heads != 1 and pattern.heads != num_q_heads:  # per-KV-head pattern: each query head reads its group's
        head_map = shape_constant(("head_map", pattern.heads, num_q_heads, num_kv_heads, device_key(device)),
                                  lambda: pattern_head_map(pattern, num_q_heads, num_kv_heads, device).int())
    if key_padding_mask is not None and num.shape[0] != batch:
        num, idx = num.expand(batch, *num.shape[1:]), idx.expand(batch, *idx.shape[1:])
        kv_full = None if kv_full is None else kv_full.expand(batch, *kv_full.shape[1:])

    pad = block_ok = None
    if key_padding_mask is not None:
        nkb = pattern.num_kv_blocks
        pad = torch.zeros(batch, nkb * bk, dtype=torch.bool, device=device)
        pad[:, :lk] = key_padding_mask.to(device)
        block_ok = pad.view(batch, nkb, bk).all(-1)  # [B, Kb]: key blocks free of padding
    if kv_full is None and pattern.token_mask is not None:
        kv_full = torch.zeros(idx.shape, dtype=torch.bool, device=device)  # evaluate the token mask everywhere
    if head_map is None and num.shape[1] not in (1, num_q_heads):
        raise ValueError(f"pattern has {num.shape[1]} heads; expected 1, {num_kv_heads} or {num_q_heads}")
    # The CPU kernel asserts that the index lists span the whole key length; the GPU kernel does not.
    width = pattern.num_kv_blocks if device.type == "cpu" else idx.shape[-1]
    args = (num, idx, kv_full, block_ok, head_map, causal, bq, bk, offset, lk, width)
    try:
        partial_num, partial_idx, full_num, full_idx = _split_fn(device)(*args)
    except Exception as error:  # a kernel failure to compile must not take attention down: run it eagerly
        _disable_split_kernel(error)
        partial_num, partial_idx, full_num, full_idx = split_lists(*args)

    mask_mod = _mask_mod(causal, offset, lk, pad, pattern.token_mask, device)
    kwargs = dict(BLOCK_SIZE=(bq, bk), mask_mod=mask_mod)
    supported = _from_kv_blocks_args()
    if "seq_lengths" in supported:
        kwargs["seq_lengths"] = seq_lengths or (lq, lk)
    if "compute_q_blocks" in supported:
        kwargs["compute_q_blocks"] = False  # only needed for the backward pass
    return BlockMask.from_kv_blocks(partial_num, partial_idx, full_num, full_idx, **kwargs)


def split_lists(num: Tensor, idx: Tensor, kv_full: Tensor | None, block_ok: Tensor | None, head_map: Tensor | None,
                causal: bool, bq: int, bk: int, offset: int, kv_len: int, width: int):
    """Split each row's selected key blocks into partial tiles (mask function evaluated) and full tiles.

    A tile is full when it lies wholly below the causal diagonal, inside the key length, holds no padded key
    (``block_ok [B, Kb]``) and the token mask leaves it whole (``kv_full``). Plain PyTorch: the reference for
    ``split_lists_triton``, which CUDA uses. ``head_map`` expands per-KV-head patterns to the query heads.
    """
    if head_map is not None:
        num, idx = num[:, head_map], idx[:, head_map]
        kv_full = None if kv_full is None else kv_full[:, head_map]
    valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    blocks = torch.where(valid, idx.long(), 0)  # entries past kv_num_blocks may hold anything
    full = valid & ((blocks + 1) * bk <= kv_len)
    if causal:
        row_start = torch.arange(num.shape[-1], device=idx.device)[:, None] * bq + offset
        full = full & ((blocks + 1) * bk - 1 <= row_start)
    if block_ok is not None:
        full = full & torch.gather(block_ok[:, None, None, :].expand(*blocks.shape[:3], block_ok.shape[-1]), -1,
                                   blocks)
    if kv_full is not None:
        full = full & kv_full
    if width > idx.shape[-1]:
        grow = width - idx.shape[-1]
        idx = torch.nn.functional.pad(idx, (0, grow))
        valid = torch.nn.functional.pad(valid, (0, grow))
        full = torch.nn.functional.pad(full, (0, grow))
    partial_num, partial_idx = _compact(idx, valid & ~full)
    full_num, full_idx = _compact(idx, full)
    return partial_num, partial_idx, full_num, full_idx


def split_lists_triton(num: Tensor, idx: Tensor, kv_full: Tensor | None, block_ok: Tensor | None,
                       head_map: Tensor | None, causal: bool, bq: int, bk: int, offset: int, kv_len: int,
                       width: int):
    """``split_lists`` in one Triton launch. The eager version is ~40 small kernels; even compiled, building a
    BlockMask took 0.29-0.47 ms per pattern on the H200, 1-3% of a sparse 128K attention call (BENCHMARKS.md,
    2026-11-29). Same arguments and results."""
    import triton

    from ._split_kernels import split_rows_kernel

    num, idx = num.to(torch.int32), idx.to(torch.int32)
    b, h_src, qb, idx_w = idx.shape
    h_out = h_src if head_map is None else head_map.shape[0]
    dev = idx.device
    outs = [torch.empty(b, h_out, qb, *shape, dtype=torch.int32, device=dev) for shape in ((), (width,), (), (width,))]
    partial_num, partial_idx, full_num, full_idx = outs
    full_arg = kv_full.view(torch.uint8) if kv_full is not None else idx
    ok_arg = block_ok.view(torch.uint8) if block_ok is not None else idx
    map_arg = head_map.to(torch.int32) if head_map is not None else idx
    fs = kv_full.stride()[:3] if kv_full is not None else (0, 0, 0)
    if idx.stride(-1) != 1 or (kv_full is not None and kv_full.stride(-1) != 1):
        raise ValueError("split_lists_triton: index rows must be contiguous")
    split_rows_kernel[(b * h_out * qb,)](
        num, idx, full_arg, ok_arg, map_arg, partial_num, partial_idx, full_num, full_idx,
        h_out, qb, idx_w, width, *num.stride(), *idx.stride()[:3], *fs,
        block_ok.stride(0) if block_ok is not None else 0, bq, bk, offset, kv_len,
        CAUSAL=bool(causal), HAS_FULL=kv_full is not None, HAS_OK=block_ok is not None,
        HAS_MAP=head_map is not None, W_P2=triton.next_power_of_2(max(width, 16)))
    return partial_num, partial_idx, full_num, full_idx


_split_impl = None


def _disable_split_kernel(error: Exception) -> None:
    global _split_impl
    import warnings

    warnings.warn(f"sparsa: Triton BlockMask construction failed ({type(error).__name__}: {error}); "
                  "using the eager version", stacklevel=3)
    _split_impl = split_lists


def _split_fn(device):
    """The tile split for a device: one Triton launch on CUDA, the plain-PyTorch version elsewhere."""
    global _split_impl
    if device.type != "cuda":
        return split_lists
    if _split_impl is None:
        from .vertical_slash import triton_available

        _split_impl = split_lists_triton if triton_available() else split_lists
    return _split_impl


def _from_kv_blocks_args():
    global _FROM_KV_ARGS
    if _FROM_KV_ARGS is None:
        from torch.nn.attention.flex_attention import BlockMask

        _FROM_KV_ARGS = set(inspect.signature(BlockMask.from_kv_blocks).parameters)
    return _FROM_KV_ARGS


def _mask_mod(causal, offset, kv_len, pad, token_mask, device):
    # Offsets and lengths are tensors, not Python ints, so that compiled code is reused across lengths; made
    # once per value with a fill kernel (torch.full), not a blocking host-to-device copy (torch.tensor).
    offset_t, kv_len_t = (shape_constant(("scalar", value, device_key(device)),
                                         lambda value=value: torch.full((), value, device=device, dtype=torch.int64))
                          for value in (offset, kv_len))

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx < kv_len_t
        if causal:
            keep = keep & (kv_idx <= q_idx + offset_t)
        if pad is not None:
            keep = keep & pad[b, kv_idx]
        if token_mask is not None:
            keep = keep & token_mask(q_idx + offset_t, kv_idx)
        return keep

    return mask_mod


def fast_path(pattern: BlockPattern, key_padding_mask: Tensor | None, device) -> bool:
    """Whether to pad to multiples of 128 and run the kernel without bounds checks (IS_DIVISIBLE), with TMA loads
    on Hopper: dense causal 1.19x -> 1.32x SDPA flash at 32K-128K on the H200 (BENCHMARKS.md).

    Only where it was verified on the GPU: no key padding, no token mask, one pattern for the whole batch.
    With a key padding mask (which also made the BlockMask per-sequence) the padded, bounds-check-free kernel
    hit an illegal memory access on the H200 (session 1: fp32, B=2, 700/1000 tokens, 128-token blocks, so not
    the block-count fault that ``padding`` fixed; not yet diagnosed), so every other case keeps the
    bounds-checked kernel."""
    pow2 = all(b >= 16 and b & (b - 1) == 0 for b in (pattern.block_q, pattern.block_k))
    return (device.type == "cuda" and key_padding_mask is None and pattern.token_mask is None
            and pattern.batch == 1 and pow2)


def padding(q_len: int, kv_len: int, block_q: int, block_k: int) -> tuple[int, int]:
    """Rows to add to the queries and the keys so that the bounds-check-free kernel (IS_DIVISIBLE) sees whole
    tiles: each length is rounded up to a multiple of its own block.

    The block counts must not change: the BlockMask has ``ceil(q_len / block_q)`` query rows, and a kernel
    that walks more query blocks than that reads past ``kv_num_blocks``. Rounding 64-token blocks up to 128
    did exactly that whenever ``q_len % 128`` fell in 1..64 -- the CUDA faults ('illegal memory access',
    'operation not supported on global/shared address space') that hip, longheads, biformer and sale hit
    on the H200 (2026-11-29). The fast path takes power-of-two blocks only, so a multiple of the block is a
    multiple of the kernel's tile (``kernel_options``: the block itself below 128, 128 or a divisor of it above).
    """
    return -q_len % block_q, -kv_len % block_k


def kernel_options(pattern: BlockPattern, device, fast: bool = False) -> dict | None:
    if device.type != "cuda":
        return None
    options = {"IS_DIVISIBLE": True} if fast else {}
    if pattern.block_q < 128 or pattern.block_k < 128:
        # The kernel's tiles must divide the pattern's blocks.
        options.update(BLOCK_M=min(pattern.block_q, 64), BLOCK_N=min(pattern.block_k, 64))
    elif fast and torch.cuda.get_device_capability(device) >= (9, 0):
        options["USE_TMA"] = True
    return options or None


def cached_block_mask(pattern: BlockPattern, batch: int, num_q_heads: int, num_kv_heads: int, *, causal: bool,
                      key_padding_mask: Tensor | None, device, seq_lengths: tuple[int, int] | None = None):
    """``build_block_mask``, reused for the same pattern object and arguments."""
    key = (batch, num_q_heads, num_kv_heads, causal, None if key_padding_mask is None else id(key_padding_mask),
           str(device), seq_lengths)
    entries = _MASKS.setdefault(pattern, {})
    hit = entries.get(key)
    if hit is not None and hit[0] is key_padding_mask:
        return hit[1]
    mask = build_block_mask(pattern, batch, num_q_heads, num_kv_heads, causal=causal,
                            key_padding_mask=key_padding_mask, device=device, seq_lengths=seq_lengths)
    entries[key] = (key_padding_mask, mask)
    return mask


def block_sparse_attention_flex(q: Tensor, k: Tensor, v: Tensor, pattern: BlockPattern, *, causal: bool,
                                scale: float, key_padding_mask: Tensor | None, return_lse: bool):
    batch, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    seq_lengths = None
    fast = fast_path(pattern, key_padding_mask, q.device)
    pad_q, pad_k = padding(lq, lk, pattern.block_q, pattern.block_k)
    if fast and (pad_q or pad_k):
        # Pad at the end: real queries keep their indices (the mask's offset is the unpadded kv_len - q_len)
        # and the mask function drops keys at or past kv_len; padded query rows are sliced off.
        q = torch.nn.functional.pad(q, (0, 0, 0, pad_q))
        k = torch.nn.functional.pad(k, (0, 0, 0, pad_k))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad_k))
        seq_lengths = (q.shape[2], k.shape[2])
    block_mask = cached_block_mask(pattern, batch, hq, hkv, causal=causal, key_padding_mask=key_padding_mask,
                                   device=q.device, seq_lengths=seq_lengths)
    result = _flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=hq != hkv, return_lse=return_lse,
                     kernel_options=kernel_options(pattern, q.device, fast))
    if return_lse:
        out, lse = result
        return out[:, :, :lq], lse[:, :, :lq].float()
    return result[:, :, :lq], None
