"""Antidiagonal block scoring with a cumulative-probability threshold (as XAttention does).

The attention mass of a block is estimated cheaply from its antidiagonals:
with stride ``S``, query ``i`` is paired with key ``j`` only where
``(i + j) mod S == S - 1``: one matrix product of the queries and the
reversed keys taken ``S`` rows at a time (``L^2 / S`` work instead of
``L^2``, in the inputs' precision, only up to the causal diagonal). Every antidiagonal
crosses every vertical and every slash line of a block, so neither kind of
important structure is missed. The strided scores go through a causal
softmax, are summed per block, and each query block keeps the fewest key
blocks whose estimated probability reaches ``threshold``. On a GPU one fused
Triton kernel computes the same block sums without writing the strided
scores to memory. ``fp8=True`` scores with e4m3 copies of the strided rows
(each scaled to its own range): twice the tensor-core rate on GPUs that have
fp8, the same rounding emulated elsewhere, and a block choice that differs
from the bf16 one only where two blocks' estimates nearly tie.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar
import math

import torch

from ..errors import require
from ..kernels._triton import half_on_gpu
from ..kernels.antidiagonal_scores import antidiagonal_block_mass, fp8_ready, fp8_rows_reference
from .base import PATTERNS, PatternBase, scaled_scores
from .masks import BlockMask, block_aligned, finalize, top_cumulative

__all__ = ["Antidiagonal", "block_mass"]

MAX_CHUNK_ELEMENTS = 2**28  # strided scores held at once (1 GiB in float32)


@PATTERNS.register("antidiagonal")
@dataclasses.dataclass(frozen=True)
class Antidiagonal(PatternBase):
    phase: ClassVar[str] = "prefill"
    stride: int = 8
    threshold: float = 0.9
    fp8: bool = False  # score with e4m3 strided rows (see the module notes)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.stride >= 1 and self.block_size % self.stride == 0, "antidiagonal needs a stride that divides block_size")
        require(0.0 < self.threshold <= 1.0, f"antidiagonal threshold must be in (0, 1], got {self.threshold}")

    def mask(self, q: torch.Tensor, k: torch.Tensor) -> BlockMask:
        lq, lk = q.shape[-2], k.shape[-2]
        bs = self.block_size
        qp, kp, _ = block_aligned(q, k, bs)
        row0 = (lk - lq) // bs * bs // self.stride  # absolute strided index of qp's first strided row
        scale = 1.0 / (math.sqrt(q.shape[-1]) * self.stride)
        fused = half_on_gpu(qp, kp) and q.shape[-1] % 16 == 0 and (fp8_ready(qp) or not self.fp8)  # head dim tiled by 16
        if fused:
            mass = antidiagonal_block_mass(qp, kp, self.stride, bs, row0, lk, scale, fp8=self.fp8)
        else:
            mass = block_mass(qp, kp, self.stride, bs, row0, lk, scale, fp8=self.fp8)
        block_probs = mass / mass.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        return finalize(top_cumulative(block_probs, self.threshold), lq, lk, bs)


def block_mass(qp: torch.Tensor, kp: torch.Tensor, s: int, bs: int, row0: int, lk: int, scale: float,
               fp8: bool = False) -> torch.Tensor:
    """The strided causal softmax summed per (query block, key block), ``[B, H, QB, KB]`` float32, with stock ops.

    ``qp``/``kp`` are block-aligned; ``row0`` is qp's first strided row (absolute);
    ``fp8`` rounds each strided row as the fp8 kernel does (then scores in float32).
    The definition the fused kernel (:func:`sparsa.kernels.antidiagonal_scores.antidiagonal_block_mass`) computes.
    """
    per = bs // s  # strided rows (and columns) per block
    kb = kp.shape[-2] // bs
    d = qp.shape[-1]
    # All S antidiagonal products at once: row i of ``qs`` is queries iS..iS+S-1 side by side, row j of
    # ``ks`` keys jS+S-1..jS (reversed), so qs @ ks^T sums q[iS+t] . k[jS+S-1-t] over t in one GEMM.
    qs = qp.reshape(*qp.shape[:2], -1, s * d)
    ks = kp.reshape(*kp.shape[:2], -1, s, d).flip(-2).reshape(*kp.shape[:2], -1, s * d)
    if fp8:
        qs, ks = fp8_rows_reference(qs), fp8_rows_reference(ks)
    cols_total = ks.shape[-2]
    heads = qs.shape[0] * qs.shape[1]
    rows_per_chunk = max(per, (MAX_CHUNK_ELEMENTS // max(1, heads * cols_total)) // per * per)
    chunks = []
    for r0 in range(0, qs.shape[-2], rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, qs.shape[-2])
        rows = row0 + torch.arange(r0, r1, device=qp.device)  # strided absolute rows
        # causal: this chunk needs the key columns up to its last row, widened to whole blocks
        ncols = min(cols_total, -(-(int(rows[-1]) + 1) // per) * per)
        scores = scaled_scores(qs[..., r0:r1, :], ks[..., :ncols, :], scale)
        # only columns past the chunk's first row can be in the future (or past the last key)
        first = min(int(rows[0]) + 1, ncols)
        cols = torch.arange(first, ncols, device=qp.device)
        scores[..., first:].masked_fill_((cols[None, :] > rows[:, None]) | (cols[None, :] * s >= lk), float("-inf"))
        probs = scores.softmax(dim=-1)  # every row keeps column 0: no row is all -inf
        sums = probs.reshape(*probs.shape[:2], (r1 - r0) // per, per, ncols // per, per).sum(dim=(3, 5))
        chunks.append(torch.nn.functional.pad(sums, (0, kb - ncols // per)))
    return torch.cat(chunks, dim=-2)
