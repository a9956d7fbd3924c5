"""S2-Attention: local blocks plus a vertical stride whose offset differs per head (context sharded).

Lin et al., "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads" (2024); the pattern of
Phi-3-small (linxihui/dkernel). Defaults from the Phi-3-small config: 64-token blocks, 16 local blocks,
vertical stride 8. One pattern per KV head (a GQA group shares it).

Note: the pattern is an architecture choice, trained with the model; on a model trained dense it loses
accuracy (the benchmark shows how much).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..pattern import BlockPattern
from ..registry import register
from .base import Selector, check_block, check_int


@register("prefill", "s2")
@dataclass
class S2(Selector):
    static = True
    local_blocks: int = 16
    vert_stride: int = 8
    block: int = 64

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "local_blocks")
        check_int(self, "vert_stride")
        check_block(self)

    def select(self, q, k, *, layer_idx=None):
        return BlockPattern.strided(q.shape[2], k.shape[2], heads=k.shape[1], local_blocks=self.local_blocks,
                                    vert_stride=self.vert_stride, block=self.block, device=q.device)
