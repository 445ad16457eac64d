"""A Triton kernel for the threshold-selection step of the attention patterns (:func:`sparsa.attention.masks.top_cumulative`).

Each row of block probabilities keeps its fewest, largest entries whose mass
reaches a threshold. With stock ops that is a sort, a cumulative sum and a
scatter back over the whole ``[B, H, QB, KB]`` tensor, several launches that
each go through memory. Here one program sorts a few rows in
registers, finds each row's cutoff value and writes the keep mask directly.

The one difference from the stock definition: entries that tie with a row's
cutoff value are all kept (the stock sort keeps an arbitrary subset of them).
Rows are at most :data:`MAX_ROW` long; longer rows use the stock ops.
"""

from __future__ import annotations

import torch

from ._triton import HAVE_TRITON, row_tile, tl, triton

__all__ = ["MAX_ROW", "top_cumulative_rows"]

MAX_ROW = 4096  # sorted in registers: 16 KiB of float32 a row


if HAVE_TRITON:

    @triton.jit
    def _top_cumulative_kernel(p_ptr, keep_ptr, R, N, threshold, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        _, _, ok, offsets = row_tile(R, N, ROWS, BLOCK_N)
        p = tl.load(p_ptr + offsets, mask=ok, other=-1.0)  # padding sorts last and carries no mass
        ordered = tl.sort(p, dim=1, descending=True)
        mass = tl.maximum(ordered, 0.0)
        before = tl.cumsum(mass, axis=1) - mass  # mass strictly before each sorted entry
        taken = (before < threshold) & (ordered >= 0.0)
        cutoff = tl.min(tl.where(taken, ordered, float("inf")), axis=1)  # the smallest value kept
        tl.store(keep_ptr + offsets, (p >= cutoff[:, None]) & (p >= 0.0), mask=ok)


def top_cumulative_rows(probs: torch.Tensor, threshold: float, rows_per_program: int = 4) -> torch.Tensor:
    """bool mask of each last-dim row's fewest largest entries reaching ``threshold`` (rows of a CUDA float32 tensor)."""
    if not HAVE_TRITON:
        raise RuntimeError("the top-cumulative kernel needs triton: pip install triton")
    n = probs.shape[-1]
    if n > MAX_ROW:
        raise ValueError(f"top_cumulative_rows: rows of {n} entries exceed {MAX_ROW}")
    p = probs.float().contiguous()
    keep = torch.empty(p.shape, dtype=torch.bool, device=p.device)
    r = p.numel() // max(n, 1)
    if r == 0 or n == 0:
        return keep
    _top_cumulative_kernel[(triton.cdiv(r, rows_per_program),)](
        p, keep, r, n, float(threshold), ROWS=rows_per_program, BLOCK_N=max(16, triton.next_power_of_2(n)), num_warps=4)
    return keep
