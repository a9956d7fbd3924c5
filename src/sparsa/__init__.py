"""sparsa: block-sparse attention for long-context transformers, with the benchmark that shows what it costs."""

from . import ops
from .masks import Neighborhood1D, Neighborhood2D, SinkWindow, TokenMask
from .pattern import BlockPattern

__version__ = "0.1.0"
__all__ = ["BlockPattern", "TokenMask", "SinkWindow", "Neighborhood1D", "Neighborhood2D", "ops"]
