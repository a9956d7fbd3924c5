"""BlockPattern: which (query block, key block) tiles of attention are computed.

Every prefill method in sparsa is a selector that returns a ``BlockPattern``; every kernel computes one.
The layout is the one ``torch.nn.attention.flex_attention.BlockMask.from_kv_blocks`` takes:

- ``kv_num_blocks [B, H, Qb]`` (int32): how many key blocks query block ``r`` computes;
- ``kv_indices [B, H, Qb, K]`` (int32): those key blocks, strictly increasing in the first
  ``kv_num_blocks`` entries (the rest is ignored).

``B`` is the batch or 1 (shared by the batch); ``H`` is the number of query heads, of key/value heads (shared
by each GQA group) or 1. Queries are the last ``q_len`` positions of the ``kv_len`` keys (prefix KV, chunked
prefill), so query block ``r`` holds query indices ``[r*block_q, (r+1)*block_q)``, i.e. positions
``kv_len - q_len`` further on. Lengths need not be multiples of the block sizes.

An optional :class:`~sparsa.masks.TokenMask` refines the pattern token by token inside its tiles
(sliding windows, neighbourhoods, sinks); ``kv_full`` then says which selected tiles the token mask leaves
fully visible, so kernels can skip evaluating the mask there.

Nothing here forms a token-by-token matrix; block-level ``[Qb, Kb]`` maps are used where a constructor needs
them (a million entries at 128K tokens with 128-token blocks).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ._shapes import device_key, shape_constant
from .masks import Neighborhood1D, Neighborhood2D, SinkWindow, TokenMask

DEFAULT_BLOCK = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_positive(**kwargs):
    for name, value in kwargs.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _geometry(q_len: int, kv_len: int, block_q: int, block_k: int) -> None:
    _check_positive(q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k)
    if q_len > kv_len:
        raise ValueError(f"q_len ({q_len}) must be <= kv_len ({kv_len}): queries are the last q_len positions")


def last_visible_block(q_len: int, kv_len: int, block_q: int, block_k: int, device=None) -> Tensor:
    """Per query block, the last key block that its last query can see under causal masking ``[Qb]``."""
    def make():
        r = torch.arange(_cdiv(q_len, block_q), device=device)
        last_q = torch.clamp((r + 1) * block_q, max=q_len) - 1 + (kv_len - q_len)
        return last_q // block_k

    return shape_constant(("last_visible_block", q_len, kv_len, block_q, block_k, device_key(device)), make)


def causal_block_mask(q_len, kv_len, block_q, block_k, device=None) -> Tensor:
    """``[Qb, Kb]`` bool: tiles that hold at least one causally visible (query, key) pair."""
    def make():
        last = last_visible_block(q_len, kv_len, block_q, block_k, device)
        return arange(_cdiv(kv_len, block_k), device)[None, :] <= last[:, None]

    return shape_constant(("causal_block_mask", q_len, kv_len, block_q, block_k, device_key(device)), make)


@functools.lru_cache(maxsize=256)
def visible_tiles(q_len: int, kv_len: int, block_q: int, block_k: int, causal: bool = True) -> int:
    """Tiles per (sequence, head) holding at least one visible (query, key) pair: arithmetic on the lengths, on
    the host (no device sync)."""
    qb, kb = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
    if not causal:
        return qb * kb
    offset = kv_len - q_len
    return sum(min((min((r + 1) * block_q, q_len) - 1 + offset) // block_k + 1, kb) for r in range(qb))


def arange(n: int, device, dtype=torch.int64) -> Tensor:
    """``torch.arange(n)``, made once per device (shared: do not modify in place)."""
    return shape_constant(("arange", n, device_key(device), dtype), lambda: torch.arange(n, device=device, dtype=dtype))


@dataclass(frozen=True, eq=False)
class BlockPattern:
    kv_num_blocks: Tensor
    kv_indices: Tensor
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    token_mask: TokenMask | None = None
    kv_full: Tensor | None = None

    def __post_init__(self):
        _geometry(self.q_len, self.kv_len, self.block_q, self.block_k)
        num, idx = self.kv_num_blocks, self.kv_indices
        if not isinstance(num, Tensor) or num.dtype != torch.int32 or num.dim() != 3:
            raise ValueError(f"kv_num_blocks must be an int32 tensor [B, H, Qb], got {_describe(num)}")
        if not isinstance(idx, Tensor) or idx.dtype != torch.int32 or idx.dim() != 4:
            raise ValueError(f"kv_indices must be an int32 tensor [B, H, Qb, K], got {_describe(idx)}")
        if idx.shape[:3] != num.shape:
            raise ValueError(
                f"kv_indices {tuple(idx.shape)} and kv_num_blocks {tuple(num.shape)} disagree on [B, H, Qb]"
            )
        if num.shape[2] != self.num_q_blocks:
            raise ValueError(
                f"kv_num_blocks has {num.shape[2]} query blocks; q_len={self.q_len} with block_q={self.block_q} "
                f"needs {self.num_q_blocks}"
            )
        if idx.device != num.device:
            raise ValueError("kv_indices and kv_num_blocks must be on the same device")
        if self.kv_full is not None and (self.kv_full.shape != idx.shape or self.kv_full.dtype != torch.bool):
            raise ValueError(f"kv_full must be a bool tensor shaped like kv_indices, got {_describe(self.kv_full)}")
        if self.token_mask is not None:
            self.token_mask.check(self.q_len, self.kv_len)

    # ----------------------------------------------------------------------------------------- geometry
    @property
    def batch(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return _cdiv(self.q_len, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return _cdiv(self.kv_len, self.block_k)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def valid_entries(self) -> Tensor:
        """``[B, H, Qb, K]`` bool: which entries of ``kv_indices`` are in use."""
        return arange(self.kv_indices.shape[-1], self.device) < self.kv_num_blocks[..., None]

    def to(self, device) -> "BlockPattern":
        full = None if self.kv_full is None else self.kv_full.to(device)
        return replace(self, kv_num_blocks=self.kv_num_blocks.to(device), kv_indices=self.kv_indices.to(device),
                       kv_full=full)

    def __repr__(self):
        return (f"BlockPattern(B={self.batch}, H={self.heads}, q_len={self.q_len}, kv_len={self.kv_len}, "
                f"block=({self.block_q}, {self.block_k}), K={self.kv_indices.shape[-1]}, "
                f"token_mask={self.token_mask})")

    # --------------------------------------------------------------------------------------- validation
    def validate(self) -> "BlockPattern":
        """Full check of the index values (costs one pass and a device sync); returns ``self``."""
        num, idx = self.kv_num_blocks.long(), self.kv_indices.long()
        k_max = idx.shape[-1]
        if bool((num < 0).any()) or bool((num > k_max).any()):
            raise ValueError(f"kv_num_blocks must lie in [0, {k_max}] (the last dim of kv_indices)")
        valid = self.valid_entries()
        bad = valid & ((idx < 0) | (idx >= self.num_kv_blocks))
        if bool(bad.any()):
            raise ValueError(
                f"kv_indices out of range: key block indices must lie in [0, {self.num_kv_blocks}) for "
                f"kv_len={self.kv_len}, block_k={self.block_k}; found {int(idx[bad][0])}"
            )
        if k_max > 1:
            both = valid[..., 1:]
            if bool((both & (idx[..., 1:] <= idx[..., :-1])).any()):
                raise ValueError("kv_indices must be strictly increasing (sorted, no repeats) in each row")
        return self

    # --------------------------------------------------------------------------------------- conversion
    def to_block_mask(self) -> Tensor:
        """``[B, H, Qb, Kb]`` bool map of the selected tiles (block level, not token level)."""
        idx = self.kv_indices.long().clamp(0, self.num_kv_blocks - 1)
        dense = torch.zeros(*idx.shape[:3], self.num_kv_blocks + 1, dtype=torch.bool, device=self.device)
        target = torch.where(self.valid_entries(), idx, self.num_kv_blocks)
        dense.scatter_(-1, target, True)
        return dense[..., :-1]

    @classmethod
    def from_block_mask(cls, mask: Tensor, *, q_len: int, kv_len: int, block_q: int = DEFAULT_BLOCK,
                        block_k: int | None = None, token_mask: TokenMask | None = None,
                        full_mask: Tensor | None = None) -> "BlockPattern":
        """Pattern from a ``[B, H, Qb, Kb]`` (or ``[Qb, Kb]``) bool map of tiles to compute."""
        block_k = block_q if block_k is None else block_k
        _geometry(q_len, kv_len, block_q, block_k)
        mask = _as_4d(mask, "mask")
        qb, kb = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
        if mask.dtype != torch.bool or mask.shape[-2:] != (qb, kb):
            raise ValueError(f"mask must be bool [..., {qb}, {kb}] for these lengths and blocks, got {_describe(mask)}")
        num = mask.sum(-1, dtype=torch.int32)
        # Index lists as wide as the key blocks (trimming them to the longest row would need a device sync).
        # Selected columns move to the front in increasing order by a cumulative-sum scatter, linear in the
        # map's size (a sort per row cost more: 32M entries at 128K tokens, 32 heads); the rest stays 0.
        slot = torch.where(mask, mask.cumsum(-1) - 1, kb)  # unselected entries go to a spill column
        col = arange(kb, mask.device, torch.int32).expand(mask.shape)
        idx = torch.zeros(*mask.shape[:-1], kb + 1, dtype=torch.int32, device=mask.device)
        idx = idx.scatter_(-1, slot, col)[..., :kb]
        valid = arange(kb, mask.device) < num[..., None]
        full = None
        if token_mask is not None:
            # Without a full map nothing is known to be fully visible: kernels must evaluate the token mask
            # on every tile (claiming tiles full would make them skip it).
            full_mask = torch.zeros_like(mask) if full_mask is None else _as_4d(full_mask, "full_mask")
            full = torch.gather(full_mask.expand_as(mask), -1, idx.long()) & valid
        return cls(num.contiguous(), idx.contiguous(), block_q, block_k, q_len, kv_len, token_mask, full)

    @classmethod
    def from_index_lists(cls, idx: Tensor, keep: Tensor, *, q_len: int, kv_len: int,
                         block: int) -> "BlockPattern":
        """Pattern from per-row candidate lists ``idx [B, H, Qb, C]`` whose kept entries (``keep``) are distinct
        key blocks, in any order: sorted here, without a device sync (the width is bounded by the block count).
        """
        from .ops.index_lists import index_lists  # one Triton launch on CUDA, ~10 small PyTorch ops otherwise

        num, out = index_lists(idx, keep, kv_len=kv_len, block=block)
        return cls(num, out, block, block, q_len, kv_len)

    # ------------------------------------------------------------------------------------ measurements
    def density(self, causal: bool = True) -> float:
        """Fraction of the (causally) visible tiles that are computed, averaged over batch and heads.

        Cached on the pattern (it is immutable): a static pattern shared by every layer is measured once.
        """
        return float(self.density_tensor(causal))

    def density_tensor(self, causal: bool = True) -> Tensor:
        """``density()`` as a 0-dim tensor on the pattern's device, computed without a host sync (the forward
        pass records it per layer; ``float()`` happens only when someone reads ``sparsa.stats``)."""
        cache = self.__dict__.setdefault("_density", {})
        if causal not in cache:
            total, picked = self._visible_counts(causal)
            cache[causal] = picked.sum() / max(float(total) * picked.numel(), 1.0)
        return cache[causal]

    def density_per_head(self, causal: bool = True) -> Tensor:
        """``[B, H]`` fraction of the visible tiles computed."""
        total, picked = self._visible_counts(causal)
        return picked / max(float(total), 1.0)

    def _visible_counts(self, causal):
        # Recorded for every layer of every forward pass: few small kernels (int32 indices compared as they are).
        valid = self.valid_entries()
        if causal:
            last = last_visible_block(self.q_len, self.kv_len, self.block_q, self.block_k, self.device)
            valid = valid & (self.kv_indices <= last[:, None])
        total = visible_tiles(self.q_len, self.kv_len, self.block_q, self.block_k, causal)
        return total, valid.sum((-1, -2)).double()

    # ------------------------------------------------------------------------------------- combination
    def union(self, other: "BlockPattern") -> "BlockPattern":
        """Tiles computed by either pattern (same lengths and blocks; batch/head dims broadcast)."""
        geometry = ("q_len", "kv_len", "block_q", "block_k")
        for name in geometry:
            if getattr(self, name) != getattr(other, name):
                raise ValueError(f"cannot union patterns with different {name}: {getattr(self, name)} vs "
                                 f"{getattr(other, name)}")
        if self.token_mask != other.token_mask:
            raise ValueError("cannot union patterns with different token masks; union their block maps instead")
        a, b = self.to_block_mask(), other.to_block_mask()
        try:
            shape = torch.broadcast_shapes(a.shape, b.shape)
        except RuntimeError:
            raise ValueError(f"batch/head dims do not broadcast: {tuple(a.shape[:2])} vs {tuple(b.shape[:2])}")
        full = None
        if self.token_mask is not None:
            full = self._full_map().expand(shape) | other._full_map().expand(shape)
        return BlockPattern.from_block_mask(a.expand(shape) | b.expand(shape), q_len=self.q_len,
                                            kv_len=self.kv_len, block_q=self.block_q, block_k=self.block_k,
                                            token_mask=self.token_mask, full_mask=full)

    def _full_map(self) -> Tensor:
        if self.kv_full is None:  # unknown: no tile is known to be fully visible under the token mask
            return torch.zeros_like(self.to_block_mask())
        full = torch.zeros(*self.kv_indices.shape[:3], self.num_kv_blocks + 1, dtype=torch.bool, device=self.device)
        target = torch.where(self.valid_entries(), self.kv_indices.long(), self.num_kv_blocks)
        full.scatter_(-1, target, self.kv_full)
        return full[..., :-1]

    def expand(self, batch: int, heads: int) -> "BlockPattern":
        """Broadcast the batch and head dims (a view; no copy)."""
        shape = (batch, heads, *self.kv_num_blocks.shape[2:])
        full = None if self.kv_full is None else self.kv_full.expand(*shape, self.kv_full.shape[-1])
        return replace(self, kv_num_blocks=self.kv_num_blocks.expand(shape),
                       kv_indices=self.kv_indices.expand(*shape, self.kv_indices.shape[-1]), kv_full=full)

    # ------------------------------------------------------------------------------------ constructors
    @classmethod
    def dense(cls, q_len: int, kv_len: int | None = None, *, causal: bool = True, block_q: int = DEFAULT_BLOCK,
              block_k: int | None = None, device=None) -> "BlockPattern":
        """Every tile (causal: every tile with a visible pair). Shape ``[1, 1, Qb, Kb]``."""
        kv_len = q_len if kv_len is None else kv_len
        block_k = block_q if block_k is None else block_k
        _geometry(q_len, kv_len, block_q, block_k)
        qb, kb = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
        if causal:
            num = last_visible_block(q_len, kv_len, block_q, block_k, device) + 1
        else:
            num = torch.full((qb,), kb, device=device)
        idx = arange(kb, device, torch.int32).expand(1, 1, qb, kb)
        return cls(num.to(torch.int32).view(1, 1, qb), idx, block_q, block_k, q_len, kv_len)

    @classmethod
    def from_token_mask(cls, token_mask: TokenMask, q_len: int, kv_len: int | None = None, *, causal: bool = True,
                        block_q: int = DEFAULT_BLOCK, block_k: int | None = None, device=None) -> "BlockPattern":
        """Tiles touched by a token mask, with the mask attached; built from its key ranges (linear memory)."""
        kv_len = q_len if kv_len is None else kv_len
        block_k = block_q if block_k is None else block_k
        _geometry(q_len, kv_len, block_q, block_k)
        token_mask.check(q_len, kv_len)
        any_map, full_map = _tiles_from_ranges(token_mask, q_len, kv_len, block_q, block_k, causal, device)
        return cls.from_block_mask(any_map, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k,
                                   token_mask=token_mask, full_mask=full_map)

    @classmethod
    def streaming(cls, q_len: int, kv_len: int | None = None, *, sink: int = 4, window: int = 1024,
                  block_q: int = DEFAULT_BLOCK, block_k: int | None = None, device=None) -> "BlockPattern":
        """Attention sinks + local window (StreamingLLM; MInference's A-shape), exact per token, causal."""
        return cls.from_token_mask(SinkWindow(sink, window), q_len, kv_len, causal=True, block_q=block_q,
                                   block_k=block_k, device=device)

    @classmethod
    def sliding_window(cls, q_len: int, kv_len: int | None = None, *, window: int, dilation: int = 1,
                       causal: bool = True, block_q: int = DEFAULT_BLOCK, block_k: int | None = None,
                       device=None) -> "BlockPattern":
        """1-D neighbourhood: ``window`` keys ``dilation`` apart around each query (NATTEN semantics).

        Causal: the query and its ``window - 1`` previous neighbours. Non-causal: centred, shifted at borders.
        """
        kv_len = q_len if kv_len is None else kv_len
        mask = Neighborhood1D(window, dilation, causal, None if causal else kv_len)
        return cls.from_token_mask(mask, q_len, kv_len, causal=causal, block_q=block_q, block_k=block_k,
                                   device=device)

    @classmethod
    def neighborhood_2d(cls, height: int, width: int, *, kernel_size, dilation=1, block_q: int = 64,
                        block_k: int | None = None, device=None) -> "BlockPattern":
        """2-D neighbourhood attention over a row-major ``height x width`` grid (non-causal, NATTEN)."""
        pair = lambda x: (x, x) if isinstance(x, int) else tuple(x)  # noqa: E731
        mask = Neighborhood2D(height, width, pair(kernel_size), pair(dilation))
        n = height * width
        return cls.from_token_mask(mask, n, n, causal=False, block_q=block_q, block_k=block_k, device=device)

    @classmethod
    def strided(cls, q_len: int, kv_len: int | None = None, *, heads: int, local_blocks: int = 16,
                vert_stride: int = 8, block: int = 64, device=None) -> "BlockPattern":
        """S2-Attention / local-stride pattern (Phi-3-small, dkernel), causal, one pattern per head.

        Query block ``r`` sees key block ``c`` when ``c`` is among its ``local_blocks`` most recent blocks, or
        when ``(c + h*step) % vert_stride == 0`` with ``step = max(1, vert_stride // heads)``: heads read
        different residues, so with ``heads >= vert_stride`` the union of heads covers every block.
        """
        kv_len = q_len if kv_len is None else kv_len
        _check_positive(heads=heads, local_blocks=local_blocks, vert_stride=vert_stride)
        _geometry(q_len, kv_len, block, block)
        last = last_visible_block(q_len, kv_len, block, block, device)[:, None]  # [Qb, 1]
        c = torch.arange(_cdiv(kv_len, block), device=device)[None, :]
        step = max(1, vert_stride // heads)
        h = torch.arange(heads, device=device)[:, None, None]
        local = (last - c < local_blocks)
        vertical = (c + h * step) % vert_stride == 0
        mask = (c <= last) & (local | vertical)
        return cls.from_block_mask(mask[None], q_len=q_len, kv_len=kv_len, block_q=block, block_k=block)

    @classmethod
    def spans(cls, q_len: int, kv_len: int | None = None, *, alpha, beta, sink: int = 64, block: int = 64,
              device=None) -> "BlockPattern":
        """MoA elastic spans: head ``h`` sees a sink block and a band of ``alpha[h] + beta[h] * kv_len`` tokens."""
        kv_len = q_len if kv_len is None else kv_len
        _geometry(q_len, kv_len, block, block)
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=device).flatten()
        beta = torch.as_tensor(beta, dtype=torch.float64, device=device).flatten()
        if alpha.shape != beta.shape or alpha.numel() == 0:
            raise ValueError(f"alpha and beta need one value per head, got {alpha.numel()} and {beta.numel()}")
        span = alpha + beta * kv_len
        if bool((span <= 0).any()):
            raise ValueError(f"every span alpha + beta*kv_len must be > 0, got {span.tolist()}")
        band = torch.ceil(span / block).long()[:, None, None]  # [H, 1, 1]
        last = last_visible_block(q_len, kv_len, block, block, device)[:, None]
        c = torch.arange(_cdiv(kv_len, block), device=device)[None, :]
        mask = (c <= last) & ((c < _cdiv(sink, block)) | (last - c < band))
        return cls.from_block_mask(mask[None], q_len=q_len, kv_len=kv_len, block_q=block, block_k=block)

    @classmethod
    def from_block_scores(cls, scores: Tensor, *, q_len: int, kv_len: int, block_q: int = DEFAULT_BLOCK,
                          block_k: int | None = None, topk: int | None = None, mass: float | None = None,
                          causal: bool = True, keep_diagonal: bool = True, keep_first: bool = True) -> "BlockPattern":
        """Select tiles from a ``[B, H, Qb, Kb]`` score map, per query block.

        ``topk``: the ``topk`` highest-scoring visible tiles. ``mass``: the fewest highest tiles whose
        (non-negative) scores sum to at least ``mass`` of the row's visible total. The diagonal tile and key
        block 0 are kept by default so that no query row is left empty.
        """
        block_k = block_q if block_k is None else block_k
        _geometry(q_len, kv_len, block_q, block_k)
        if (topk is None) == (mass is None):
            raise ValueError("give exactly one of topk (int >= 1) or mass (float in (0, 1])")
        scores = _as_4d(scores, "scores").float()
        qb, kb = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
        if scores.shape[-2:] != (qb, kb):
            raise ValueError(f"scores must be [..., {qb}, {kb}] for these lengths and blocks, got {tuple(scores.shape)}")
        visible = causal_block_mask(q_len, kv_len, block_q, block_k, scores.device) if causal else \
            torch.ones(qb, kb, dtype=torch.bool, device=scores.device)
        if topk is not None:
            if not isinstance(topk, int) or topk < 1:
                raise ValueError(f"topk must be an int >= 1, got {topk!r}")
            k = min(topk, kb)
            masked = scores.masked_fill(~visible, float("-inf"))
            top = torch.topk(masked, k, dim=-1)
            picked = torch.zeros_like(visible.expand_as(scores))
            picked.scatter_(-1, top.indices, top.values > float("-inf"))
        else:
            if not 0.0 < float(mass) <= 1.0:
                raise ValueError(f"mass must be in (0, 1], got {mass!r}")
            # float64 so that the fraction is not rounded to float32 (0.3f * 90 > 27 would keep one block too many)
            s = scores.double().clamp(min=0).masked_fill(~visible, 0.0)
            # invisible tiles sort last, so that the one tile always kept is a visible one
            vals, order = torch.sort(s.masked_fill(~visible, -1.0), dim=-1, descending=True)
            vals = vals.clamp(min=0)
            before = torch.cumsum(vals, -1) - vals
            keep = before < float(mass) * s.sum(-1, keepdim=True)
            keep[..., 0] = True
            picked = torch.zeros_like(keep)
            picked.scatter_(-1, order, keep)
            picked &= visible
        if keep_diagonal:
            last = last_visible_block(q_len, kv_len, block_q, block_k, scores.device) if causal else None
            if last is not None:
                diag = arange(kb, scores.device)[None, :] == last.clamp(max=kb - 1)[:, None]
                picked = picked | diag
        if keep_first:
            picked[..., 0] = True
        return cls.from_block_mask(picked, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k)


# ------------------------------------------------------------------------------------------------ helpers
def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _as_4d(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() == 2:
        return x[None, None]
    if x.dim() == 3:
        return x[None]
    if x.dim() != 4:
        raise ValueError(f"{name} must have 2 to 4 dims [B, H, Qb, Kb], got shape {tuple(x.shape)}")
    return x


def _tiles_from_ranges(tm: TokenMask, q_len, kv_len, block_q, block_k, causal, device):
    """Tiles touched (``any``) and fully covered (``full``) by each query block's key ranges ``[Qb, Kb]``.

    Each query's ranges are turned into block intervals and accumulated with difference arrays, so the cost
    is linear in the number of (query, range) pairs.
    """
    qb, kb = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
    q_pos = torch.arange(q_len, device=device) + (kv_len - q_len)
    start, end = tm.key_ranges(q_pos, kv_len)
    start = start.clamp(min=0)
    end = end.clamp(max=kv_len - 1)
    if causal:
        end = torch.minimum(end, q_pos[:, None])
    nonempty = start <= end
    row = (torch.arange(q_len, device=device) // block_q)[:, None].expand_as(start)

    def intervals(lo, hi, ok):
        acc = torch.zeros(qb, kb + 1, dtype=torch.int64, device=device)
        flat = acc.view(-1)
        lo = torch.where(ok, lo, 0)
        hi = torch.where(ok, hi + 1, 0)
        ones = ok.long()
        flat.index_add_(0, (row * (kb + 1) + lo).flatten(), ones.flatten())
        flat.index_add_(0, (row * (kb + 1) + hi).flatten(), -ones.flatten())
        return acc.cumsum(-1)[:, :kb]

    touched = intervals(start // block_k, end // block_k, nonempty) > 0
    if not tm.exact_ranges:
        return touched, torch.zeros_like(touched)
    # Blocks lying entirely inside a range: [ceil(start/bk), floor((end+1)/bk) - 1]; the key tail block is
    # never "full" here (the kernel handles the length bound).
    first_full = _cdiv_t(start, block_k)
    last_full = (end + 1) // block_k - 1
    covered = intervals(first_full, last_full, nonempty & (first_full <= last_full))
    queries_in_row = torch.bincount(torch.arange(q_len, device=device) // block_q, minlength=qb)
    full = covered == queries_in_row[:, None]
    return touched, full & touched


def _cdiv_t(a: Tensor, b: int) -> Tensor:
    return -torch.div(-a, b, rounding_mode="floor")
