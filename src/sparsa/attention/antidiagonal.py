"""Antidiagonal block scoring with a cumulative-probability threshold (as XAttention does).

The attention mass of a block is estimated cheaply from its antidiagonals:
with stride ``S``, query ``i`` is paired with key ``j`` only where
``(i + j) mod S == S - 1``: one matrix product of the queries and the
reversed keys taken ``S`` rows at a time (``L^2 / S`` work instead of
``L^2``, in the inputs' precision, only up to the causal diagonal). Every antidiagonal
crosses every vertical and every slash line of a block, so neither kind of
important structure is missed. The strided scores go through a causal
softmax, are summed per block, and each query block keeps the fewest key
blocks whose estimated probability reaches ``threshold``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar
import math

import torch

from ..errors import require
from .base import PATTERNS, PatternBase, scaled_scores
from .masks import BlockMask, block_aligned, finalize, top_cumulative

__all__ = ["Antidiagonal"]

MAX_CHUNK_ELEMENTS = 2**28  # strided scores held at once (1 GiB in float32)


@PATTERNS.register("antidiagonal")
@dataclasses.dataclass(frozen=True)
class Antidiagonal(PatternBase):
    phase: ClassVar[str] = "prefill"
    stride: int = 8
    threshold: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.stride >= 1 and self.block_size % self.stride == 0, "antidiagonal needs a stride that divides block_size")
        require(0.0 < self.threshold <= 1.0, f"antidiagonal threshold must be in (0, 1], got {self.threshold}")

    def mask(self, q: torch.Tensor, k: torch.Tensor) -> BlockMask:
        lq, lk = q.shape[-2], k.shape[-2]
        bs, s = self.block_size, self.stride
        qp, kp, _ = block_aligned(q, k, bs)
        q_start = (lk - lq) // bs * bs  # absolute position of qp's first row
        per = bs // s  # strided rows (and columns) per block
        kb = kp.shape[-2] // bs
        d = q.shape[-1]
        # All S antidiagonal products at once: row i of ``qs`` is queries iS..iS+S-1 side by side, row j of
        # ``ks`` keys jS+S-1..jS (reversed), so qs @ ks^T sums q[iS+t] . k[jS+S-1-t] over t in one GEMM.
        qs = qp.reshape(*qp.shape[:2], -1, s * d)
        ks = kp.reshape(*kp.shape[:2], -1, s, d).flip(-2).reshape(*kp.shape[:2], -1, s * d)
        cols_total = ks.shape[-2]
        heads = qs.shape[0] * qs.shape[1]
        rows_per_chunk = max(per, (MAX_CHUNK_ELEMENTS // max(1, heads * cols_total)) // per * per)
        chunks = []
        for r0 in range(0, qs.shape[-2], rows_per_chunk):
            r1 = min(r0 + rows_per_chunk, qs.shape[-2])
            rows = q_start // s + torch.arange(r0, r1, device=q.device)  # strided absolute rows
            # causal: this chunk needs the key columns up to its last row, widened to whole blocks
            ncols = min(cols_total, -(-(int(rows[-1]) + 1) // per) * per)
            scores = scaled_scores(qs[..., r0:r1, :], ks[..., :ncols, :], 1.0 / (math.sqrt(d) * s))
            # only columns past the chunk's first row can be in the future (or past the last key)
            first = min(int(rows[0]) + 1, ncols)
            cols = torch.arange(first, ncols, device=q.device)
            scores[..., first:].masked_fill_((cols[None, :] > rows[:, None]) | (cols[None, :] * s >= lk), float("-inf"))
            probs = scores.softmax(dim=-1)  # every row keeps column 0: no row is all -inf
            sums = probs.reshape(*probs.shape[:2], (r1 - r0) // per, per, ncols // per, per).sum(dim=(3, 5))
            chunks.append(torch.nn.functional.pad(sums, (0, kb - ncols // per)))
        block_probs = torch.cat(chunks, dim=-2)
        block_probs = block_probs / block_probs.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        return finalize(top_cumulative(block_probs, self.threshold), lq, lk, bs)
