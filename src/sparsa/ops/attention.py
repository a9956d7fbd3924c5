"""The one kernel entry: ``block_sparse_attention``."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..pattern import BlockPattern
from .flex import block_sparse_attention_flex, flex_available
from .naive import block_sparse_attention_naive

BACKENDS = ("auto", "triton", "flex", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_warned: set[str] = set()


_CPU_FLEX_FAILED = False


def _mark_cpu_flex_failed() -> None:
    global _CPU_FLEX_FAILED
    _CPU_FLEX_FAILED = True


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, pattern: BlockPattern | None = None, *,
                           causal: bool = True, scale: float | None = None, return_lse: bool = False,
                           key_padding_mask: Tensor | None = None, backend: str = "auto", validate: bool = True):
    """Attention over the tiles a :class:`~sparsa.BlockPattern` selects.

    Args:
        q: ``[B, Hq, Lq, D]``; the queries are the last ``Lq`` positions of the keys (prefix KV / chunked prefill).
        k, v: ``[B, Hkv, Lk, D]`` with ``Hq`` a multiple of ``Hkv`` (grouped-query attention, never repeated).
        pattern: tiles to compute; ``None`` means dense (causal if ``causal``).
        causal: also mask keys after each query's position.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the natural-log log-sum-exp ``[B, Hq, Lq]`` (float32), to merge partial results.
        key_padding_mask: ``[B, Lk]`` bool, True for real keys.
        backend: ``"triton"`` (one Triton launch, forward only; ``sparsa.ops.triton_attention``), ``"flex"``
            (compiled FlexAttention), ``"reference"`` (plain PyTorch, linear memory) or ``"auto"``: on CUDA triton
            where it applies (at least 128 queries, no token-level mask, no gradient needed, fp16 / bf16 / fp32,
            head dim <= 256) and flex otherwise; reference elsewhere. A Triton kernel that fails warns once and
            hands over to flex.
        validate: check the pattern's index values (one pass, one sync).

    Returns:
        ``out [B, Hq, Lq, Dv]`` in q's dtype, or ``(out, lse)``. Rows that see no key give 0 and ``lse = -inf``.
    """
    _check_inputs(q, k, v, key_padding_mask, backend)
    batch, hq, lq, dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if pattern is None:
        pattern = BlockPattern.dense(lq, lk, causal=causal, device=q.device)
    _check_pattern(pattern, batch, hq, hkv, lq, lk)
    if validate:
        pattern.validate()
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(q.device)

    chosen = select_backend(backend, q, return_lse, pattern=pattern, k=k, v=v)
    if chosen == "triton":
        result = _triton(q, k, v, pattern, causal, float(scale), key_padding_mask, strict=backend == "triton")
        if result is not None:
            return result if return_lse else result[0]
        chosen = "flex"  # the kernel failed (warned once): FlexAttention from now on
    if chosen == "flex" and q.device.type == "cpu" and _CPU_FLEX_FAILED:
        chosen = "reference"
    if chosen == "flex":
        try:
            out, lse = block_sparse_attention_flex(q, k, v, pattern, causal=causal, scale=float(scale),
                                                   key_padding_mask=key_padding_mask, return_lse=return_lse)
        except RuntimeError as error:
            if q.device.type != "cpu":
                raise
            # torch 2.13's CPU FlexAttention kernel, once recompiled for dynamic shapes, fails its own bounds
            # check ("index out of bounds: 0 <= tmp < cur_qSplitSize") on many later calls with a key padding
            # mask: 12 of 40 random padded calls in one process (2026-11-29), none computing wrongly. It raises
            # rather than computing wrongly, so: the reference backend, for this and every later CPU call.
            _mark_cpu_flex_failed()
            warn_once("flex-cpu-error", f"FlexAttention on the CPU failed ({str(error)[-120:]}); using the "
                                        "reference backend for CPU calls from now on")
            chosen = "reference"
    if chosen != "flex":
        out, lse = block_sparse_attention_naive(q, k, v, pattern, causal=causal, scale=float(scale),
                                                key_padding_mask=key_padding_mask)
    return (out, lse) if return_lse else out


def _triton(q, k, v, pattern, causal, scale, key_padding_mask, strict):
    """The Triton kernel's ``(out, lse)``; chosen automatically (``strict`` False), ``None`` once it has failed."""
    from ._fallback import triton_or_reference
    from .triton_attention import block_sparse_attention_triton

    def fast():
        return block_sparse_attention_triton(q, k, v, pattern, causal=causal, scale=scale,
                                             key_padding_mask=key_padding_mask)

    return fast() if strict else triton_or_reference("block_sparse_attention", fast, lambda: None,
                                                           instead="FlexAttention")


def select_backend(backend: str, q: Tensor, return_lse: bool = False, *, pattern: BlockPattern | None = None,
                   k: Tensor | None = None, v: Tensor | None = None) -> str:
    if backend == "auto":
        if not q.is_cuda or q.dtype == torch.float64:
            return "reference"
        if pattern is not None and _triton_applies(q, k, v, pattern):
            return "triton"
        return "flex" if flex_available() else "reference"
    if backend == "triton":
        from .triton_attention import supports
        from .vertical_slash import triton_available

        if not triton_available():
            raise ValueError("backend='triton' needs Triton installed")
        if pattern is not None and not supports(pattern, q, v if v is not None else q):
            raise ValueError(f"backend='triton' does not take this case: dtype {q.dtype}, head dim "
                             f"{q.shape[-1]}, blocks {pattern.block_q}x{pattern.block_k}, token mask "
                             f"{pattern.token_mask is not None} (it needs fp16/bf16/fp32, head dim <= 256, "
                             "blocks with a power-of-two divisor >= 16, no token mask)")
        if _needs_grad(q, k, v):
            raise ValueError("backend='triton' is forward-only: use backend='flex' where a gradient is needed")
        return backend
    if backend == "flex":
        if not flex_available():
            raise ValueError("backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
        if q.device.type == "cpu" and return_lse:
            warn_once("flex-cpu-lse", "FlexAttention on the CPU cannot return the log-sum-exp when compiled; "
                                      "using the reference backend for these calls")
            return "reference"
        if q.dtype == torch.float64:
            warn_once("flex-f64", "FlexAttention does not take float64; using the reference backend")
            return "reference"
    return backend


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# Shortest query run that ``auto`` gives to the Triton kernel: it runs one program per query tile and head and
# walks each program's keys in sequence, while compiled FlexAttention switches to its decoding kernel below 128
# queries and splits the keys across programs (a few hundred programs of a 128K-key walk each would idle the GPU).
TRITON_MIN_QUERIES = 128


def _triton_applies(q: Tensor, k: Tensor | None, v: Tensor | None, pattern: BlockPattern) -> bool:
    from ._fallback import failed_ops
    from .triton_attention import supports
    from .vertical_slash import triton_available

    return (q.shape[2] >= TRITON_MIN_QUERIES and triton_available() and "block_sparse_attention" not in failed_ops()
            and not _needs_grad(q, k, v) and supports(pattern, q, v if v is not None else q))


def _check_inputs(q, k, v, key_padding_mask, backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on [B, Hkv, Lk]")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the key/value heads ({hkv})")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q has more positions ({q.shape[2]}) than k ({k.shape[2]}): queries must be the last "
                         "Lq positions of the keys")
    if q.shape[2] == 0:
        raise ValueError("q has no positions")
    if key_padding_mask is not None:
        if (not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool
                or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2])):
            got = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, Tensor) else type(key_padding_mask)
            raise ValueError(f"key_padding_mask must be a bool tensor [B, Lk] = {(k.shape[0], k.shape[2])}, got {got}")


def _check_pattern(pattern, batch, hq, hkv, lq, lk):
    if not isinstance(pattern, BlockPattern):
        raise ValueError(f"pattern must be a sparsa.BlockPattern, got {type(pattern).__name__}")
    if pattern.q_len != lq or pattern.kv_len != lk:
        raise ValueError(f"pattern was built for q_len={pattern.q_len}, kv_len={pattern.kv_len} but the inputs "
                         f"have Lq={lq}, Lk={lk}")
    if pattern.batch not in (1, batch):
        raise ValueError(f"pattern batch dim must be 1 or {batch}, got {pattern.batch}")
    if pattern.heads not in (1, hq, hkv):
        raise ValueError(f"pattern head dim must be 1, {hkv} (KV heads) or {hq} (query heads), got {pattern.heads}")


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two attentions over disjoint key sets by their log-sum-exps: ``(out, lse)`` of the union."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.exp(lse_a - safe)[..., None]
    wb = torch.exp(lse_b - safe)[..., None]
    out = (out_a.float() * wa + out_b.float() * wb).to(out_a.dtype)
    return out, lse
