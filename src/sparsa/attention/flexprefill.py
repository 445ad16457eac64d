"""Query-aware per-head budgets (as FlexPrefill does): a query-specific or a shared pattern, per head.

For each head, the last query block's true attention (pooled per key block)
is compared with a cheap estimate from block-averaged queries and keys. If
the two distributions agree (Jensen-Shannon divergence below ``divergence``),
the estimate is trusted for every query block: each keeps the fewest key
blocks that reach ``coverage`` of its estimated probability (query-aware).
Otherwise the head gets a vertical-slash pattern from the last block's
attention, keeping the fewest columns and diagonals that reach ``coverage``
(shared). Budgets therefore adapt per head and per input.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar
import math

import torch

from ..errors import require
from .base import PATTERNS, PatternBase
from .masks import BlockMask, block_aligned, finalize, pool_blocks, top_cumulative
from .vertical_slash import line_scores, lines_to_blocks

__all__ = ["FlexPrefill", "js_divergence"]


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence along the last dim (natural log), for rows that sum to 1."""
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log()), torch.zeros_like(a)).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@PATTERNS.register("flexprefill")
@dataclasses.dataclass(frozen=True)
class FlexPrefill(PatternBase):
    phase: ClassVar[str] = "prefill"
    coverage: float = 0.9  # gamma: probability mass each query block (or head) must keep
    divergence: float = 0.1  # tau: JS divergence under which the pooled estimate is trusted

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 < self.coverage <= 1.0, f"flexprefill coverage must be in (0, 1], got {self.coverage}")
        require(self.divergence >= 0.0, "flexprefill divergence must be >= 0")

    def mask(self, q: torch.Tensor, k: torch.Tensor) -> BlockMask:
        lq, lk = q.shape[-2], k.shape[-2]
        bs = self.block_size
        kb = -(-lk // bs)
        last = min(bs, lq)
        columns, diagonals, total = line_scores(q, k, last)  # [B, H, Lk] each; each query's row sums to 1
        true_blocks = torch.nn.functional.pad(columns, (0, kb * bs - lk)).reshape(*columns.shape[:2], kb, bs).sum(-1)
        true_blocks = true_blocks / true_blocks.sum(-1, keepdim=True)

        qp, kp, _ = block_aligned(q, k, bs)
        pooled = (pool_blocks(qp, bs) @ pool_blocks(kp, bs).transpose(-1, -2)) / math.sqrt(q.shape[-1])
        qb = pooled.shape[-2]
        own = (lk - lq) // bs + torch.arange(qb, device=q.device)
        pooled = pooled.masked_fill(torch.arange(kb, device=q.device)[None, :] > own[:, None], float("-inf"))
        estimate = pooled.softmax(-1)  # [B, H, QB, KB]
        trusted = js_divergence(estimate[..., -1, :], true_blocks) < self.divergence  # [B, H]

        query_aware = top_cumulative(estimate, self.coverage)
        shared = lines_to_blocks(top_cumulative(columns / total, self.coverage),
                                 top_cumulative(diagonals / total, self.coverage), lq, lk, bs)
        blocks = torch.where(trusted[..., None, None], query_aware, shared)
        return finalize(blocks, lq, lk, bs)
