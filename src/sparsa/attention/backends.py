"""Block-sparse attention backends: one mask format, several ways to run it.

* ``reference``: plain PyTorch on any device. For each query block it
  gathers only the key blocks the mask keeps, so memory grows with the kept
  blocks, never with ``L x L``. Slow (a Python loop over query blocks) but
  exact: the yardstick for the others and the CPU path.
* ``flex``: PyTorch FlexAttention driven by the same block mask (converted to
  FlexAttention's ``BlockMask`` without building any token-level tensor) with
  a causal ``mask_mod``; compiled on CUDA, eager elsewhere.
* ``masked``: dense SDPA with the token-level mask the block mask implies,
  over chunks of query rows (at most ``MASKED_CHUNK_ELEMENTS`` mask entries
  at once): the same function, no faster than dense; the quick way to
  measure accuracy on a CPU.
* ``triton``: our own Triton kernel (:mod:`sparsa.kernels.block_sparse_attn`)
  walking each query block's kept key blocks with an online softmax.

All take ``q [B, H, Lq, D]``, ``k, v [B, Hkv, Lk, D]`` (``H`` a multiple of
``Hkv``: grouped-query heads) and return ``[B, H, Lq, D]`` in q's dtype.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from ..kernels._triton import HAVE_TRITON
from ..kernels.devices import on_input_device
from ..registry import Registry
from .masks import BlockMask, block_aligned

__all__ = ["BACKENDS", "attend", "flex", "kept_lists", "masked", "reference", "triton_kernel"]

BACKENDS: Registry = Registry("attention backend")
MASKED_CHUNK_ELEMENTS = 1 << 26


def _check(q, k, v, mask: BlockMask) -> None:
    b, h, lq, _ = q.shape
    if k.shape[1] == 0 or h % k.shape[1] or k.shape != v.shape[:-1] + (k.shape[-1],) or k.shape[-2] != mask.k_len:
        raise InputError(f"attention shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"mask for {mask.q_len} queries over {mask.k_len} keys")
    if lq != mask.q_len or mask.blocks.shape[:2] != (b, h):
        raise InputError(f"block mask {tuple(mask.blocks.shape)} does not match q {tuple(q.shape)}")


@BACKENDS.register("reference")
def reference(q, k, v, mask: BlockMask, scale: float | None = None) -> torch.Tensor:
    _check(q, k, v, mask)
    b, h, lq, d = q.shape
    lk, bs = mask.k_len, mask.block_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    offset = lk - lq
    kb = -(-lk // bs)
    heads = torch.arange(h, device=q.device) // (h // k.shape[1])
    pad = kb * bs - lk
    k_blocks = torch.nn.functional.pad(k, (0, 0, 0, pad))[:, heads].reshape(b, h, kb, bs, -1)
    v_blocks = torch.nn.functional.pad(v, (0, 0, 0, pad))[:, heads].reshape(b, h, kb, bs, -1)
    out = torch.empty((b, h, lq, v.shape[-1]), dtype=q.dtype, device=q.device)
    first = offset // bs
    for j in range(mask.blocks.shape[2]):
        start = max((first + j) * bs - offset, 0)
        stop = min((first + j + 1) * bs - offset, lq)
        keep = mask.blocks[:, :, j]  # [B, H, KB]
        count = int(keep.sum(-1).max())
        idx = keep.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :count]  # [B, H, m]
        valid = keep.gather(-1, idx)
        gather = idx[..., None, None].expand(-1, -1, -1, bs, d)
        kg = k_blocks.gather(2, gather).reshape(b, h, count * bs, d).float()
        vg = v_blocks.gather(2, idx[..., None, None].expand(-1, -1, -1, bs, v.shape[-1])).reshape(b, h, count * bs, -1).float()
        pos = (idx[..., None] * bs + torch.arange(bs, device=q.device)).reshape(b, h, count * bs)
        ok = (valid[..., None].expand(-1, -1, -1, bs).reshape(b, h, count * bs)) & (pos < lk)
        rows = torch.arange(start, stop, device=q.device) + offset  # absolute positions
        allowed = ok[:, :, None, :] & (pos[:, :, None, :] <= rows[None, None, :, None])
        scores = (q[:, :, start:stop].float() @ kg.transpose(-1, -2)) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out[:, :, start:stop] = (probs @ vg).to(q.dtype)
    return out


_COMPILED = None


def _flex_fn(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    global _COMPILED
    if device.type != "cuda":
        return flex_attention
    if _COMPILED is None:
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


def kept_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, how many key blocks are kept and which (ascending, in the first ``count`` entries; the rest 0): int32.

    A mask shared by every batch row and head (expanded, as streaming's is) is listed once and expanded alike."""
    if blocks.dim() == 4 and blocks.stride(0) == 0 and blocks.stride(1) == 0:
        counts, indices = kept_lists(blocks[0, 0])
        return counts.expand(*blocks.shape[:3]), indices.expand(blocks.shape)
    if blocks.is_cuda and HAVE_TRITON:
        from ..kernels.block_sparse_attn import kept_block_lists

        return kept_block_lists(blocks)
    counts = blocks.sum(-1, dtype=torch.int32)
    kb = blocks.shape[-1]
    # a kept block goes to its rank among the kept ones, every other to a spare last column (a sort costs 5x more)
    slot = torch.where(blocks, blocks.cumsum(-1) - 1, kb)
    indices = torch.zeros((*blocks.shape[:-1], kb + 1), dtype=torch.int32, device=blocks.device)
    indices.scatter_(-1, slot, torch.arange(kb, dtype=torch.int32, device=blocks.device).expand(blocks.shape))
    return counts, indices[..., :kb]


def to_flex(mask: BlockMask, q_rows: int):
    """FlexAttention's BlockMask for ``mask`` (queries padded to block-aligned ``q_rows``).

    Kept blocks strictly below the diagonal are "full" (no per-element work);
    the diagonal blocks are "partial" and apply causality. The ``mask_mod``
    also checks block membership, so FlexAttention's eager (non-compiled)
    path, which reads only the ``mask_mod``, computes the same function.
    """
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    bs = mask.block_size
    first = (mask.k_len - mask.q_len) // bs * bs  # absolute position of padded row 0
    blocks = mask.blocks
    own = first // bs + torch.arange(blocks.shape[2], device=blocks.device)
    kb = torch.arange(blocks.shape[3], device=blocks.device)
    full = blocks & (kb[None, :] < own[:, None])
    partial = blocks & ~full

    counts, indices = kept_lists(partial)
    full_counts, full_indices = kept_lists(full)

    def causal_in_blocks(b, h, q_idx, kv_idx):
        return (q_idx + first >= kv_idx) & blocks[b, h, q_idx // bs, kv_idx // bs]

    return FlexBlockMask.from_kv_blocks(counts, indices, full_counts, full_indices, BLOCK_SIZE=bs,
                                        mask_mod=causal_in_blocks, seq_lengths=(q_rows, mask.k_len))


@BACKENDS.register("flex")
def flex(q, k, v, mask: BlockMask, scale: float | None = None) -> torch.Tensor:
    _check(q, k, v, mask)
    lq = q.shape[-2]
    qp, _, front = block_aligned(q, k, mask.block_size)
    fn = _flex_fn(q.device)
    # the compiled kernel's tiles must divide our blocks: its defaults (128) are kept for blocks of 128 and more
    small = q.is_cuda and mask.block_size < 128
    options = {"BLOCK_M": mask.block_size, "BLOCK_N": mask.block_size} if small else None
    out = fn(qp, k, v, block_mask=to_flex(mask, qp.shape[-2]), scale=scale, enable_gqa=k.shape[1] != q.shape[1],
             kernel_options=options)
    return out[:, :, front : front + lq]


@BACKENDS.register("masked")
def masked(q, k, v, mask: BlockMask, scale: float | None = None) -> torch.Tensor:
    _check(q, k, v, mask)
    b, h, lq, _ = q.shape
    # query rows in chunks, so the token mask never exceeds MASKED_CHUNK_ELEMENTS (L x L would not fit at 128k)
    rows = max(1, MASKED_CHUNK_ELEMENTS // (b * h * mask.k_len))
    out = torch.empty((b, h, lq, v.shape[-1]), dtype=q.dtype, device=q.device)
    for start in range(0, lq, rows):
        stop = min(start + rows, lq)
        keys = mask.q_offset + stop  # causal: later keys are never seen by these rows
        out[:, :, start:stop] = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:stop], k[:, :, :keys], v[:, :, :keys], attn_mask=mask.token_mask(start, stop)[..., :keys],
            scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out


@BACKENDS.register("triton")
def triton_kernel(q, k, v, mask: BlockMask, scale: float | None = None, **launch) -> torch.Tensor:
    """Our Triton kernel; ``launch`` options (``num_warps``, ``num_stages``, ``block_m``) go to the kernel launch."""
    from ..kernels.block_sparse_attn import block_sparse_attention

    _check(q, k, v, mask)
    lq = q.shape[-2]
    qp, _, front = block_aligned(q, k, mask.block_size)
    counts, indices = mask.derived("kept_lists", lambda: kept_lists(mask.blocks))
    first = (mask.k_len - mask.q_len) // mask.block_size * mask.block_size
    out = block_sparse_attention(qp, k, v, counts, indices, mask.block_size, first, scale, **launch)
    return out[:, :, front : front + lq]


@on_input_device(0)
def attend(q, k, v, mask: BlockMask, scale: float | None = None, backend: str = "reference", **launch) -> torch.Tensor:
    """Block-sparse causal attention on the named backend (``launch`` options for the triton backend only)."""
    return BACKENDS.get(backend)(q, k, v, mask, scale, **launch)
