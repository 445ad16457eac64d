"""Antidiagonal block scoring with a cumulative-probability threshold (as XAttention does).

The attention mass of a block is estimated cheaply from its antidiagonals:
with stride ``S``, query ``i`` is paired with key ``j`` only where
``(i + j) mod S == S - 1``, which is ``S`` matrix products of length-``L/S``
strided slices (``L^2 / S`` work instead of ``L^2``). Every antidiagonal
crosses every vertical and every slash line of a block, so neither kind of
important structure is missed. The strided scores go through a causal
softmax, are summed per block, and each query block keeps the fewest key
blocks whose estimated probability reaches ``threshold``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import require
from .base import PATTERNS, PatternBase
from .masks import BlockMask, block_aligned, finalize, top_cumulative

__all__ = ["Antidiagonal"]


@PATTERNS.register("antidiagonal")
@dataclasses.dataclass(frozen=True)
class Antidiagonal(PatternBase):
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
        scores = sum(qp[..., t::s, :].float() @ kp[..., s - 1 - t :: s, :].float().transpose(-1, -2) for t in range(s))
        scores = scores / (math.sqrt(q.shape[-1]) * s)
        rows = q_start // s + torch.arange(scores.shape[-2], device=q.device)  # strided absolute rows
        cols = torch.arange(scores.shape[-1], device=q.device)
        valid_cols = cols * s < lk
        scores = scores.masked_fill((cols[None, :] > rows[:, None]) | ~valid_cols[None, :], float("-inf"))
        probs = scores.softmax(dim=-1).nan_to_num(0.0)
        qb, kb, per = scores.shape[-2] * s // bs, scores.shape[-1] * s // bs, bs // s
        block_probs = probs.reshape(*probs.shape[:2], qb, per, kb, per).sum(dim=(3, 5))
        block_probs = block_probs / block_probs.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        return finalize(top_cumulative(block_probs, self.threshold), lq, lk, bs)
