"""sparsa: block-sparse attention for long-context transformers, with the benchmark that shows what it costs.

    import sparsa                      # registers attn_implementation="sparsa" (nothing is monkeypatched)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sparsa")
    sparsa.configure(model, prefill="flexprefill")
"""

from . import ops
from .hf import configure, register as _register_hf, stats
from .masks import Neighborhood1D, Neighborhood2D, SinkWindow, TokenMask
from .pattern import BlockPattern
from .registry import methods

__version__ = "0.1.0"

_register_hf()

__all__ = ["configure", "stats", "methods", "BlockPattern", "TokenMask", "SinkWindow", "Neighborhood1D",
           "Neighborhood2D", "ops"]
