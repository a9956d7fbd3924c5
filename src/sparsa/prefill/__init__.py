"""Prefill selectors, one file each; importing this package registers them."""

from .a_shape import AShape
from .biformer import BiFormer, biformer_attention_2d
from .base import DEFAULT_DENSE_BELOW, Selector
from .dense import Dense
from .flexprefill import FlexPrefill
from .hip import HiP
from .hyper import Hyper
from .longheads import LongHeads
from .moa import MoA
from .s2 import S2
from .sale import SALE
from .sliding_window import SlidingWindow
from .streaming import Streaming
from .vertical_slash import VerticalSlash

__all__ = ["Selector", "DEFAULT_DENSE_BELOW", "Dense", "Streaming", "AShape", "SlidingWindow", "S2", "MoA", "FlexPrefill",
           "VerticalSlash", "SALE", "HiP", "LongHeads", "BiFormer",
           "biformer_attention_2d", "Hyper"]
