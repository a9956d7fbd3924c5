"""sparsa: block-sparse attention for long-context transformers, with the benchmark that shows what it costs."""

from . import ops
from .hf import configure, stats
from .registry import methods
from .masks import Neighborhood1D, Neighborhood2D, SinkWindow, TokenMask
from .pattern import BlockPattern

__version__ = "0.1.0"
from .hf import register as _register_hf

_register_hf()

__all__ = ["configure", "stats", "methods", "BlockPattern", "TokenMask", "SinkWindow", "Neighborhood1D", "Neighborhood2D", "ops"]
