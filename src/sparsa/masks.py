"""Token-level masks that refine a block pattern inside its blocks.

A block pattern says which (query block, key block) tiles are computed. Some patterns are defined per token
(a sliding window of W tokens, NATTEN's neighbourhoods, 4 sink tokens): the tiles on their edges are only
partly visible. A ``TokenMask`` gives the exact rule, evaluated elementwise inside the partial tiles, and a
conservative description of each query's keys as a few index ranges, from which the block pattern (tiles
touched) and the fully visible tiles are derived without ever forming a token-by-token matrix.

Positions are absolute: a query's position is its index plus ``kv_len - q_len`` (queries are the last
``q_len`` positions of the key sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class TokenMask:
    """Base class. Subclasses are small frozen dataclasses of plain ints, so they hash and compare by value."""

    #: True when every key inside the ranges returned by :meth:`key_ranges` is visible (no holes), so tiles
    #: covered by a range are fully visible.
    exact_ranges: bool = True

    def __call__(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Boolean visibility for broadcastable tensors of query and key positions."""
        raise NotImplementedError

    def key_ranges(self, q_pos: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Disjoint inclusive key ranges ``(start, end)`` of shape ``[Lq, R]`` that contain every visible key.

        An empty range has ``start > end``.
        """
        raise NotImplementedError

    def check(self, q_len: int, kv_len: int) -> None:
        """Raise ``ValueError`` when the mask is undefined for these lengths."""


@dataclass(frozen=True)
class SinkWindow(TokenMask):
    """The first ``sink`` keys plus the last ``window`` keys up to the query (StreamingLLM, A-shape)."""

    sink: int
    window: int

    def __post_init__(self):
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")

    def __call__(self, q_pos, k_pos):
        # "up to the query": never a later key, so the rule matches key_ranges even without causal masking
        return (k_pos <= q_pos) & ((k_pos < self.sink) | ((q_pos - k_pos) < self.window))

    def key_ranges(self, q_pos, kv_len):
        sink_end = torch.full_like(q_pos, min(self.sink, kv_len) - 1)
        win_start = torch.clamp(q_pos - self.window + 1, min=self.sink)
        starts = torch.stack([torch.zeros_like(q_pos), win_start], -1)
        ends = torch.stack([torch.minimum(sink_end, q_pos), q_pos], -1)
        return starts, ends


def _axis_window(p: Tensor, length: Tensor, kernel: int, causal: bool) -> Tensor:
    """First index of a NATTEN window along one (undilated) axis: shifted, not truncated, at the borders."""
    if causal:
        return torch.clamp(p - kernel + 1, min=0)
    return torch.minimum(torch.clamp(p - kernel // 2, min=0), length - kernel)


def _dilated_window(i: Tensor, extent: int, kernel: int, dilation: int, causal: bool):
    """(first neighbour, last neighbour) positions of ``i`` on an axis of ``extent``, neighbours ``dilation`` apart.

    Dilation splits the axis into ``dilation`` interleaved sub-sequences (index mod dilation) and runs the
    undilated rule inside each one, as NATTEN defines it.
    """
    rho = i % dilation
    p = i // dilation
    sub_len = (extent - rho + dilation - 1) // dilation
    start = _axis_window(p, sub_len, kernel, causal)
    end = p if causal else start + kernel - 1
    return rho + dilation * start, rho + dilation * end


def _in_dilated_window(qi, ki, extent, kernel, dilation, causal):
    first, last = _dilated_window(qi, extent, kernel, dilation, causal)
    return (ki % dilation == qi % dilation) & (ki >= first) & (ki <= last)


@dataclass(frozen=True)
class Neighborhood1D(TokenMask):
    """1-D neighbourhood attention (NATTEN): ``kernel`` keys around each query, ``dilation`` apart.

    Causal: the query and the ``kernel - 1`` previous neighbours (a sliding window when dilation is 1).
    Non-causal: a window centred on the query, shifted (not truncated) at the borders of a key axis of
    ``extent`` positions (the key length).
    """

    kernel: int
    dilation: int = 1
    causal: bool = True
    extent: int | None = None

    def __post_init__(self):
        if self.kernel < 1:
            raise ValueError(f"kernel_size must be >= 1, got {self.kernel}")
        if self.dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {self.dilation}")
        if not self.causal and self.extent is None:
            raise ValueError("extent (the key length) is required for non-causal neighbourhood attention")

    @property
    def exact_ranges(self):
        return self.dilation == 1

    def check(self, q_len, kv_len):
        if not self.causal and self.extent != kv_len:
            raise ValueError(f"extent ({self.extent}) must equal kv_len ({kv_len}) for non-causal neighbourhood "
                             "attention: the window is shifted at the borders of the key axis")
        if not self.causal and kv_len < self.kernel * self.dilation:
            raise ValueError(
                f"kv_len ({kv_len}) must be >= kernel_size * dilation ({self.kernel} * {self.dilation}) "
                "for non-causal neighbourhood attention"
            )

    def __call__(self, q_pos, k_pos):
        extent = self.extent if self.extent is not None else 1 << 62
        return _in_dilated_window(q_pos, k_pos, extent, self.kernel, self.dilation, self.causal)

    def key_ranges(self, q_pos, kv_len):
        first, last = _dilated_window(q_pos, kv_len, self.kernel, self.dilation, self.causal)
        return first[:, None], last[:, None]


@dataclass(frozen=True)
class Neighborhood2D(TokenMask):
    """2-D neighbourhood attention (NATTEN) over an ``height x width`` grid flattened row-major; non-causal."""

    height: int
    width: int
    kernel: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)

    def __post_init__(self):
        for name, pair in (("kernel_size", self.kernel), ("dilation", self.dilation)):
            if len(pair) != 2 or min(pair) < 1:
                raise ValueError(f"{name} must be two positive ints, got {pair}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"grid shape must be positive, got {(self.height, self.width)}")

    @property
    def exact_ranges(self):
        return self.dilation[1] == 1

    def check(self, q_len, kv_len):
        n = self.height * self.width
        if q_len != n or kv_len != n:
            raise ValueError(f"q_len and kv_len must equal height*width = {n}, got {q_len} and {kv_len}")
        for axis, extent, k, d in (("height", self.height, *self._axis(0)), ("width", self.width, *self._axis(1))):
            if extent < k * d:
                raise ValueError(f"grid {axis} ({extent}) must be >= kernel_size * dilation ({k} * {d})")

    def _axis(self, a):
        return self.kernel[a], self.dilation[a]

    def __call__(self, q_pos, k_pos):
        qy, qx = q_pos // self.width, q_pos % self.width
        ky, kx = k_pos // self.width, k_pos % self.width
        in_y = _in_dilated_window(qy, ky, self.height, *self._axis(0), False)
        in_x = _in_dilated_window(qx, kx, self.width, *self._axis(1), False)
        return in_y & in_x

    def key_ranges(self, q_pos, kv_len):
        qy, qx = q_pos // self.width, q_pos % self.width
        (ky, dy), (kx, dx) = self._axis(0), self._axis(1)
        y_first, _ = _dilated_window(qy, self.height, ky, dy, False)
        x_first, x_last = _dilated_window(qx, self.width, kx, dx, False)
        rows = y_first[:, None] + dy * torch.arange(ky, device=q_pos.device)  # [Lq, ky]
        return rows * self.width + x_first[:, None], rows * self.width + x_last[:, None]
