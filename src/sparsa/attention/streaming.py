"""Streaming / A-shape attention: a few sink blocks at the start plus a local window.

Every query block keeps the first ``sink_blocks`` key blocks (the "attention
sinks" that absorb much of the probability mass) and the ``local_blocks``
key blocks just before and at its own position. Static: it ignores the
queries and keys, which makes it the cheapest pattern to estimate.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import torch

from ..errors import require
from .base import PATTERNS, PatternBase
from .masks import BlockMask, _query_block_starts, finalize


@PATTERNS.register("streaming")
@dataclasses.dataclass(frozen=True)
class Streaming(PatternBase):
    sink_blocks: int = 1
    local_blocks: int = 4
    reads_keys: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.sink_blocks >= 0 and self.local_blocks >= 1, "streaming needs sink_blocks >= 0 and local_blocks >= 1")

    def mask(self, q: torch.Tensor, k: torch.Tensor) -> BlockMask:
        b, h, lq, _ = q.shape
        return _mask(b, h, lq, k.shape[-2], self.block_size, self.sink_blocks, self.local_blocks, q.device)

    def decode_key_ranges(self, k_len: int) -> tuple[tuple[int, int], ...]:
        """The sink blocks and the window of local blocks ending at the query's own block (merged where they meet)."""
        bs = self.block_size
        own = (k_len - 1) // bs
        sinks = min(self.sink_blocks, own + 1) * bs
        local = max(own - self.local_blocks + 1, 0) * bs
        if local <= sinks:
            return ((0, k_len),)
        return ((0, sinks), (local, k_len)) if sinks else ((local, k_len),)

    def decode_key_slots(self, first: torch.Tensor, last: torch.Tensor, k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sink slots, then a window of ``local_blocks`` blocks ending at the query's block; a window slot that
        is also a sink is read twice and attended once."""
        bs, sink = self.block_size, self.sink_blocks * self.block_size
        offset = (last - first)[:, None]  # the query's position from the row's first slot, [B, 1]
        start = (offset // bs - self.local_blocks + 1) * bs
        window = start + torch.arange(self.local_blocks * bs, device=first.device)
        sinks = torch.arange(sink, device=first.device).expand(len(first), -1)
        keep = torch.cat([sinks <= offset, (window >= sink) & (window >= 0) & (window <= offset)], dim=1)
        index = (first[:, None] + torch.cat([sinks, window], dim=1)).clamp(0, k_len - 1)
        return index, keep


@functools.lru_cache(maxsize=4)
def _mask(b: int, h: int, lq: int, lk: int, bs: int, sink: int, local: int, device: torch.device) -> BlockMask:
    """The mask, made once per shape: every layer of a forward pass asks for the same one, and what the backends
    derive from it (kept-block lists, density) is then made once too. Shared, so read-only (as :class:`BlockMask`
    says)."""
    own = _query_block_starts(lq, lk, bs, device) // bs  # [QB]
    kb = torch.arange(-(-lk // bs), device=device)
    keep = (kb[None, :] < sink) | ((own[:, None] - kb[None, :] >= 0) & (own[:, None] - kb[None, :] < local))
    blocks = finalize(keep, lq, lk, bs).blocks
    return BlockMask(blocks.expand(b, h, *blocks.shape), bs, lq, lk)
