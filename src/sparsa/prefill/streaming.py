"""StreamingLLM as a prefill pattern: attention sinks plus a recent window, exact per token.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024). Defaults follow the
official code (mit-han-lab/streaming-llm): 4 sink tokens, 2000 recent tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..pattern import BlockPattern
from ..registry import register
from .base import Selector, check_block, check_int


@register("prefill", "streaming")
@dataclass
class Streaming(Selector):
    static = True
    sink: int = 4
    window: int = 2000
    block: int = 128

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "sink", minimum=0)
        check_int(self, "window")
        check_block(self)

    def select(self, q, k, *, layer_idx=None):
        return BlockPattern.streaming(q.shape[2], k.shape[2], sink=self.sink, window=self.window,
                                      block_q=self.block, device=q.device)
