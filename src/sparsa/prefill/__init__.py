"""Prefill selectors, one file each; importing this package registers them."""

from .a_shape import AShape
from .base import DEFAULT_DENSE_BELOW, Selector
from .dense import Dense
from .moa import MoA
from .s2 import S2
from .sliding_window import SlidingWindow
from .streaming import Streaming

__all__ = ["Selector", "DEFAULT_DENSE_BELOW", "Dense", "Streaming", "AShape", "SlidingWindow", "S2", "MoA"]
