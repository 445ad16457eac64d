"""Query-aware KV page selection for decoding (as Quest does).

Keys are grouped in pages of ``block_size`` tokens; each page keeps the
channel-wise minimum and maximum of its keys. For a query ``q``, the largest
score any key of the page could reach is ``sum_d max(q_d min_d, q_d max_d)``;
the ``pages`` pages with the highest bound are attended, plus the query's
own page. With ``pages`` at least the number of pages it is dense attention.
For several queries (a prefill chunk), a query block takes the maximum bound
over its queries.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..errors import require
from .base import PATTERNS, PatternBase
from .masks import BlockMask, finalize, num_query_blocks

__all__ = ["Quest", "page_bounds"]

ROWS = 256


def page_bounds(k: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise min and max of each page of keys: two ``[B, H, pages, D]`` tensors."""
    lk = k.shape[-2]
    pages = -(-lk // page)
    pad = pages * page - lk
    kf = k.float()
    lo = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("inf")).reshape(*k.shape[:2], pages, page, -1).amin(-2)
    hi = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("-inf")).reshape(*k.shape[:2], pages, page, -1).amax(-2)
    return lo, hi


@PATTERNS.register("quest")
@dataclasses.dataclass(frozen=True)
class Quest(PatternBase):
    phase: ClassVar[str] = "decode"
    pages: int = 16  # pages attended per query (besides its own)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.pages >= 1, f"quest needs pages >= 1, got {self.pages}")

    def mask(self, q: torch.Tensor, k: torch.Tensor) -> BlockMask:
        lq, lk = q.shape[-2], k.shape[-2]
        bs = self.block_size
        lo, hi = page_bounds(k, bs)
        offset = lk - lq
        qb = num_query_blocks(lq, lk, bs)
        per_block = torch.full((*q.shape[:2], qb, lo.shape[-2]), float("-inf"), device=q.device)
        for start in range(0, lq, ROWS):  # bounded memory: rows x pages x D at a time
            qf = q[..., start : start + ROWS, :].float()[..., None, :]  # [B, H, r, 1, D]
            bound = torch.maximum(qf * lo[..., None, :, :], qf * hi[..., None, :, :]).sum(-1)  # [B, H, r, pages]
            rows = torch.arange(start, start + bound.shape[-2], device=q.device)
            index = ((rows + offset) // bs - offset // bs)[None, None, :, None].expand_as(bound)
            per_block.scatter_reduce_(2, index, bound, reduce="amax")
        own = offset // bs + torch.arange(qb, device=q.device)
        per_block = per_block.masked_fill(torch.arange(lo.shape[-2], device=q.device)[None, :] > own[:, None], float("-inf"))
        top = per_block.topk(min(self.pages, per_block.shape[-1]), dim=-1).indices
        blocks = torch.zeros_like(per_block, dtype=torch.bool).scatter(-1, top, True)
        return finalize(blocks, lq, lk, bs)
