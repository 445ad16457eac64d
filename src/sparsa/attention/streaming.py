"""Streaming / A-shape attention: a few sink blocks at the start plus a local window.

Every query block keeps the first ``sink_blocks`` key blocks (the "attention
sinks" that absorb much of the probability mass) and the ``local_blocks``
key blocks just before and at its own position. Static: it ignores the
queries and keys, which makes it the cheapest pattern to estimate.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import require
from .base import PATTERNS, PatternBase
from .masks import BlockMask, _query_block_starts, finalize


@PATTERNS.register("streaming")
@dataclasses.dataclass(frozen=True)
class Streaming(PatternBase):
    sink_blocks: int = 1
    local_blocks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.sink_blocks >= 0 and self.local_blocks >= 1, "streaming needs sink_blocks >= 0 and local_blocks >= 1")

    def mask(self, q: torch.Tensor, k: torch.Tensor) -> BlockMask:
        b, h, lq, _ = q.shape
        lk = k.shape[-2]
        bs = self.block_size
        own = _query_block_starts(lq, lk, bs, q.device) // bs  # [QB]
        kb = torch.arange(-(-lk // bs), device=q.device)
        keep = (kb[None, :] < self.sink_blocks) | ((own[:, None] - kb[None, :] >= 0) & (own[:, None] - kb[None, :] < self.local_blocks))
        return finalize(keep.expand(b, h, *keep.shape), lq, lk, bs)
