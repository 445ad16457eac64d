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
from typing import ClassVar
import math

import torch

from ..errors import require
from .base import PATTERNS, PatternBase
from .masks import BlockMask, block_aligned, finalize, top_cumulative

__all__ = ["Antidiagonal"]

CHUNK_ROWS = 2048  # query rows scored at a time


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
        per = bs // s
        kb = kp.shape[-2] // bs
        cols = torch.arange(kp.shape[-2] // s, device=q.device)
        invalid_cols = cols * s >= lk
        k_strided = [kp[..., s - 1 - t :: s, :].float().transpose(-1, -2) for t in range(s)]
        chunks = []
        rows_per_chunk = max(1, CHUNK_ROWS // bs) * bs  # softmax rows are independent: bounded memory
        for r0 in range(0, qp.shape[-2], rows_per_chunk):
            qc = qp[..., r0 : r0 + rows_per_chunk, :]
            scores = sum(qc[..., t::s, :].float() @ k_strided[t] for t in range(s)) / (math.sqrt(q.shape[-1]) * s)
            rows = (q_start + r0) // s + torch.arange(scores.shape[-2], device=q.device)  # strided absolute rows
            scores = scores.masked_fill((cols[None, :] > rows[:, None]) | invalid_cols[None, :], float("-inf"))
            probs = scores.softmax(dim=-1).nan_to_num(0.0)
            chunks.append(probs.reshape(*probs.shape[:2], probs.shape[-2] // per, per, kb, per).sum(dim=(3, 5)))
        block_probs = torch.cat(chunks, dim=-2)
        block_probs = block_probs / block_probs.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        return finalize(top_cumulative(block_probs, self.threshold), lq, lk, bs)
