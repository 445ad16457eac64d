"""The block-mask format every attention pattern produces and every backend consumes.

A :class:`BlockMask` says, per batch element and head, which key blocks each
query block attends to: ``blocks`` is a bool tensor ``[B, H, QB, KB]`` over
blocks of ``block_size`` tokens. Queries are the *last* ``q_len`` positions
of a sequence of ``k_len`` keys (``q_len == k_len`` for a prefill from
position 0, ``q_len == 1`` for a decode step), so query ``i`` sits at
absolute position ``k_len - q_len + i``.

Token-level causality is always applied on top by the backends; the block
mask only ever removes work. Every pattern's mask passes through
:func:`finalize`, which clears blocks above the causal diagonal and keeps
each query block's diagonal block, so that every query sees at least itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..kernels._triton import HAVE_TRITON
from ..kernels.top_cumulative import MAX_ROW, top_cumulative_rows

__all__ = ["BlockMask", "block_aligned", "causal_blocks", "finalize", "full", "top_cumulative"]


@dataclass
class BlockMask:
    blocks: torch.Tensor  # bool [B, H, QB, KB]; read-only: a pattern may share it between calls (replace, never edit)
    block_size: int
    q_len: int
    k_len: int
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def derived(self, name: str, make):
        """``make()``, computed once per ``blocks`` tensor: a mask a pattern hands out for many calls (streaming's,
        one per shape) pays for what the backends derive from it (density, kept-block lists) once."""
        entry = self._derived.get(name)
        if entry is None or entry[0] is not self.blocks:
            entry = self._derived[name] = (self.blocks, make())
        return entry[1]

    @property
    def q_offset(self) -> int:
        return self.k_len - self.q_len

    def density(self) -> float:
        """Kept blocks over the blocks a dense causal attention computes (1.0 = dense)."""
        return float(self.density_tensor())

    def density_tensor(self) -> torch.Tensor:
        """:meth:`density` as a float32 scalar on the mask's device: reading it later does not stop the GPU now."""
        causal = causal_block_count(self.q_len, self.k_len, self.block_size) * self.blocks.shape[0] * self.blocks.shape[1]
        return self.derived("density", lambda: self.blocks.sum(dtype=torch.float32) / float(causal))

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def token_mask(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The token-level mask ``[B, H, stop - start, k_len]`` (causal and block mask) of queries ``start:stop``."""
        bs = self.block_size
        stop = self.q_len if stop is None else stop
        rows = torch.arange(start, stop, device=self.blocks.device)
        cols = torch.arange(self.k_len, device=self.blocks.device)
        qb = (rows + self.q_offset) // bs - self.q_offset // bs
        kb = cols // bs
        expanded = self.blocks[:, :, qb][:, :, :, kb]
        return expanded & ((rows[:, None] + self.q_offset) >= cols[None, :])


def _query_block_starts(q_len: int, k_len: int, block: int, device) -> torch.Tensor:
    """Absolute position of the first query of each query block (blocks aligned to absolute positions)."""
    offset = k_len - q_len
    first = offset // block
    last = (k_len - 1) // block
    return torch.arange(first, last + 1, device=device) * block


def num_query_blocks(q_len: int, k_len: int, block: int) -> int:
    offset = k_len - q_len
    return (k_len - 1) // block - offset // block + 1


def causal_block_count(q_len: int, k_len: int, block: int) -> int:
    """How many blocks :func:`causal_blocks` keeps, counted on the host: query block ``i`` (in absolute
    blocks) sees key blocks ``0..i``."""
    first, last = (k_len - q_len) // block, (k_len - 1) // block
    return (last + 1) * (last + 2) // 2 - first * (first + 1) // 2


def causal_blocks(q_len: int, k_len: int, block: int, device=None) -> torch.Tensor:
    """bool ``[QB, KB]``: the blocks that hold at least one causal (query, key) pair."""
    starts = _query_block_starts(q_len, k_len, block, device)
    q_last = torch.clamp(starts + block - 1, max=k_len - 1)
    kb = torch.arange(math.ceil(k_len / block), device=device) * block
    return kb[None, :] <= q_last[:, None]


def diagonal_blocks(q_len: int, k_len: int, block: int, device=None) -> torch.Tensor:
    """bool ``[QB, KB]``: each query block's own diagonal block."""
    starts = _query_block_starts(q_len, k_len, block, device)
    kb = torch.arange(math.ceil(k_len / block), device=device)
    return kb[None, :] == (starts // block)[:, None]


def full(batch: int, heads: int, q_len: int, k_len: int, block: int, device=None) -> BlockMask:
    """The dense causal mask in block form (every causal block kept)."""
    causal = causal_blocks(q_len, k_len, block, device)
    return BlockMask(causal.expand(batch, heads, *causal.shape).clone(), block, q_len, k_len)


def finalize(blocks: torch.Tensor, q_len: int, k_len: int, block: int) -> BlockMask:
    """Clip a pattern's blocks to the causal region and keep every diagonal block."""
    causal = causal_blocks(q_len, k_len, block, blocks.device)
    diagonal = diagonal_blocks(q_len, k_len, block, blocks.device)
    return BlockMask((blocks & causal) | diagonal, block, q_len, k_len)


def top_cumulative(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool mask of the fewest entries (along the last dim) whose probabilities sum to ``threshold``.

    ``probs`` rows are non-negative and sum to 1 (a row of zeros keeps everything).
    On a GPU, rows of up to :data:`~sparsa.kernels.top_cumulative.MAX_ROW`
    entries go through one Triton kernel (which also keeps ties with the cutoff).
    """
    if probs.is_cuda and HAVE_TRITON and 0 < probs.shape[-1] <= MAX_ROW:
        return top_cumulative_rows(probs, threshold)
    ordered, order = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(dim=-1) - ordered  # mass strictly before each entry
    keep_sorted = before < threshold
    keep = torch.zeros_like(keep_sorted)
    return keep.scatter(-1, order, keep_sorted)


def pool_blocks(x: torch.Tensor, block: int, dim: int = -2) -> torch.Tensor:
    """Mean (float32) over consecutive blocks of ``block`` positions along ``dim`` (the last block may be short)."""
    length = x.shape[dim]
    pad = (-length) % block
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat((x, x.new_zeros(shape)), dim=dim)
    counts = torch.full((length + pad,), 1.0, device=x.device)
    if pad:
        counts[length:] = 0.0
    new_shape = list(x.shape)
    new_shape[dim : dim + 1] = [(length + pad) // block, block]
    sums = x.reshape(new_shape).sum(dim=dim + 1 if dim >= 0 else dim, dtype=torch.float32)
    n = counts.reshape(-1, block).sum(-1).clamp_min(1.0)
    view = [1] * sums.dim()
    view[dim if dim >= 0 else sums.dim() + dim] = n.numel()
    return sums / n.view(view).to(sums.dtype)


def block_aligned(q: torch.Tensor, k: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Queries padded at the front to a block boundary (and both at the end to whole blocks).

    Returns ``(q, k, front)``: query row ``r`` of the result sits at absolute
    position ``start + r`` where ``start`` is the first query block's start.
    """
    lq, lk = q.shape[-2], k.shape[-2]
    offset = lk - lq
    front = offset % block
    q_rows = num_query_blocks(lq, lk, block) * block
    k_rows = -(-lk // block) * block
    back = q_rows - lq - front
    qp = torch.nn.functional.pad(q, (0, 0, front, back)) if front or back else q
    kp = torch.nn.functional.pad(k, (0, 0, 0, k_rows - lk)) if k_rows > lk else k
    return qp, kp, front
