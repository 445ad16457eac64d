"""Vertical-slash attention: important key columns plus important diagonals (as MInference estimates them).

Long-context attention maps are dominated by a few *vertical* lines (keys
that every query attends to, e.g. sinks and salient tokens) and *slash*
lines (fixed distances back, e.g. the local window). Both are estimated
from the actual attention of the last ``last_q`` queries: a column's score
is its total probability, a diagonal's (offset ``i - j``) the total
probability along it. The top ``vertical`` columns and ``slash`` diagonals
(counts of tokens) are kept, then widened to the blocks that contain them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import math

import torch

from ..errors import require
from ..kernels._triton import half_on_gpu
from ..kernels.line_scores import last_query_line_scores
from .base import PATTERNS, PatternBase, last_queries_softmax
from .masks import BlockMask, _query_block_starts, finalize

__all__ = ["VerticalSlash", "column_and_diagonal_scores", "line_scores", "lines_to_blocks"]


def column_and_diagonal_scores(probs: torch.Tensor, k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column and per-diagonal probability mass ``[B, H, Lk]`` each, from the last queries' ``probs [B, H, n, Lk]``."""
    n = probs.shape[-2]
    columns = probs.sum(dim=-2)
    # Query row r sits at position k_len - n + r, so key j is on diagonal (k_len - n + r) - j. Read
    # against reversed offsets c' = k_len - 1 - offset, row r needs key r - (n - 1) + c': with n - 1
    # zero columns in front, that is element r + c' of the padded row, so a view whose row stride is
    # one longer than the padded row lines every diagonal up in one column, and one sum adds them.
    padded = torch.nn.functional.pad(probs, (n - 1, 0)).contiguous()
    width = padded.shape[-1]
    skewed = padded.as_strided((*probs.shape[:-2], n, k_len), (*padded.stride()[:-2], width + 1, 1))
    diagonals = skewed.sum(dim=-2).flip(-1)
    return columns, diagonals


def line_scores(q: torch.Tensor, k: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Column and diagonal scores of the last ``count`` queries' causal attention, and how many queries that was.

    On a GPU (half precision, power-of-two ``count`` and head dim) one fused
    Triton pass computes them without writing the probabilities out.
    """
    lk = k.shape[-2]
    n = min(count, q.shape[-2])
    d = q.shape[-1]
    if half_on_gpu(q, k) and n >= 16 and not n & (n - 1) and d >= 16 and not d & (d - 1):
        columns, diagonals = last_query_line_scores(q[..., q.shape[-2] - n :, :], k, lk, 1.0 / math.sqrt(d))
    else:
        columns, diagonals = column_and_diagonal_scores(last_queries_softmax(q, k, n), lk)
    return columns, diagonals, n


def lines_to_blocks(columns: torch.Tensor, diagonals: torch.Tensor, q_len: int, k_len: int, block: int) -> torch.Tensor:
    """bool ``[B, H, QB, KB]``: the blocks holding a chosen column or crossing a chosen diagonal.

    ``columns`` and ``diagonals`` are bool ``[B, H, Lk]`` (diagonal ``d``: keys ``d`` positions back).
    """
    kb_count = -(-k_len // block)
    pad = kb_count * block - k_len
    col_blocks = torch.nn.functional.pad(columns, (0, pad)).reshape(*columns.shape[:2], kb_count, block).any(dim=-1)
    starts = _query_block_starts(q_len, k_len, block, columns.device)
    kstarts = torch.arange(kb_count, device=columns.device) * block
    diff = starts[:, None] - kstarts[None, :]  # [QB, KB]: query block start - key block start
    lo = (diff - block + 1).clamp(0, k_len)
    hi = (diff + block).clamp(0, k_len)  # exclusive
    counts = torch.nn.functional.pad(diagonals.to(torch.int32).cumsum(dim=-1), (1, 0))  # [B, H, Lk + 1]
    flat = counts.reshape(-1, k_len + 1)
    in_range = flat[:, hi.reshape(-1)] - flat[:, lo.reshape(-1)]
    diag_blocks = (in_range > 0).reshape(*columns.shape[:2], *diff.shape)
    return diag_blocks | col_blocks[:, :, None, :]


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    count = max(1, min(count, scores.shape[-1]))
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    return chosen.scatter(-1, scores.topk(count, dim=-1).indices, True)


@PATTERNS.register("vertical_slash")
@dataclasses.dataclass(frozen=True)
class VerticalSlash(PatternBase):
    phase: ClassVar[str] = "prefill"
    vertical: int = 1024  # key columns kept
    slash: int = 1024  # diagonals kept
    last_q: int = 64  # queries used for the estimate

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.vertical >= 1 and self.slash >= 1 and self.last_q >= 1, "vertical_slash needs vertical, slash and last_q >= 1")

    def mask(self, q: torch.Tensor, k: torch.Tensor) -> BlockMask:
        lq, lk = q.shape[-2], k.shape[-2]
        columns, diagonals, _ = line_scores(q, k, self.last_q)
        diagonals[..., 0] = float("inf")  # the main diagonal always (each query sees its neighbourhood)
        blocks = lines_to_blocks(_top(columns, self.vertical), _top(diagonals, self.slash), lq, lk, self.block_size)
        return finalize(blocks, lq, lk, self.block_size)
