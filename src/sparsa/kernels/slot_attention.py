"""Triton decode attention over chosen cache slots: each row's one query attends the slots ``index`` keeps.

A static attention pattern's decode step (streaming: the sink blocks and a
local window) keeps a fixed number ``n`` of cache slots per row, found on the
device (:meth:`sparsa.attention.base.PatternBase.decode_key_slots`). Done
with stock operations, that step gathers the keys and values into new
tensors, repeats them for grouped-query heads and runs SDPA under a mask:
five kernels per layer, against dense's three. Here it is two, and nothing
is copied:

* ``_slot_partial_kernel``: one program per (row, unit, chunk of ``BLOCK_N``
  slots), a unit being the query heads that read one list of slots: those
  sharing a key-value head when every head keeps the same slots, one query
  head when each keeps its own (quest). It loads the unit's query heads
  (padded to 16 rows for the tensor cores), reads the chunk's kept keys and
  values straight from the cache through ``index`` (a slot that is not kept
  issues no load), and writes the chunk's softmax maximum, normaliser and
  unnormalised output in float32.
* ``_slot_combine_kernel``: one program per (row, query head) merges the
  chunks (the online softmax's rescaling) and writes ``[B, 1, H, D]`` in the
  query's dtype, the layout transformers' attention functions return.

Splitting the slots over programs keeps many loads in flight: one decode
query has too little work to fill a GPU otherwise.
"""

from __future__ import annotations

import torch

from ._triton import HAVE_TRITON, tl, triton

__all__ = ["HAVE_TRITON", "slot_attention"]

LOG2E = 1.4426950408889634
BLOCK_N = 64  # slots per program
MIN_ROWS = 16  # the tensor cores' smallest M: query heads of a group are padded to it


if HAVE_TRITON:

    @triton.jit
    def _slot_partial_kernel(q_ptr, k_ptr, v_ptr, index_ptr, keep_ptr, m_ptr, l_ptr, acc_ptr,
                             U, G, R, N, CHUNKS, qk_scale,
                             sqb, sqh, skb, skh, skm, svb, svh, svm, sib, siu, skb2, sku,
                             D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)  # b * U + unit: a unit is G query heads that read one list of slots
        chunk = tl.program_id(1)
        b = (row // U).to(tl.int64)  # offsets into a large cache pass 2**31
        unit = (row % U).to(tl.int64)
        kvh = unit // R  # R units share a key-value head
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + b * sqb + (unit * G + g)[:, None] * sqh + d[None, :],
                    mask=(g < G)[:, None] & d_ok[None, :], other=0.0)
        cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = cols < N
        slot = tl.load(index_ptr + b * sib + unit * siu + cols, mask=c_ok, other=0).to(tl.int64)
        kept = (tl.load(keep_ptr + b * skb2 + unit * sku + cols, mask=c_ok, other=0) != 0) & c_ok
        load_ok = kept[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * skb + kvh * skh + slot[:, None] * skm + d[None, :], mask=load_ok, other=0.0)
        v = tl.load(v_ptr + b * svb + kvh * svh + slot[:, None] * svm + d[None, :], mask=load_ok, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_G, BLOCK_N], log2 units
        s = tl.where(kept[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        m_use = tl.where(m == float("-inf"), 0.0, m)  # a chunk with nothing kept adds nothing
        p = tl.math.exp2(s - m_use[:, None])
        acc = tl.dot(p.to(v.dtype), v)  # [BLOCK_G, BLOCK_D] float32
        at = (row * CHUNKS + chunk) * BLOCK_G + g
        tl.store(m_ptr + at, m)
        tl.store(l_ptr + at, tl.sum(p, axis=1))
        tl.store(acc_ptr + at[:, None] * BLOCK_D + d[None, :], acc)

    @triton.jit
    def _slot_combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, H, G, CHUNKS, sob, soh,
                             D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)  # b * H + query head
        b = pid // H
        h = pid % H
        row = b * (H // G) + h // G  # its (row, unit)
        c = tl.arange(0, BLOCK_C)
        d = tl.arange(0, BLOCK_D)
        c_ok = c < CHUNKS
        at = (row * CHUNKS + c) * BLOCK_G + h % G
        m = tl.load(m_ptr + at, mask=c_ok, other=float("-inf"))
        m_all = tl.max(m, axis=0)
        scale = tl.where(c_ok & (m > float("-inf")), tl.math.exp2(m - m_all), 0.0)
        l = tl.sum(tl.load(l_ptr + at, mask=c_ok, other=0.0) * scale, axis=0)
        acc = tl.load(acc_ptr + at[:, None] * BLOCK_D + d[None, :], mask=c_ok[:, None], other=0.0)
        out = tl.sum(acc * scale[:, None], axis=0) / l
        tl.store(o_ptr + b * sob + h * soh + d, out.to(o_ptr.dtype.element_ty), mask=d < D)


def slot_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, keep: torch.Tensor,
                   scale: float | None = None) -> torch.Tensor:
    """Attention of one query per row over the cache slots it keeps: ``[B, 1, H, D]`` (transformers' layout).

    ``q`` ``[B, H, 1, D]``; ``k``, ``v`` ``[B, Hkv, L, D]`` (the cache; ``H`` a
    multiple of ``Hkv``, each key-value head serving ``H / Hkv`` query heads);
    ``index`` the slots to read, ``[B, n]`` for every head alike or
    ``[B, H, n]`` per query head; ``keep`` of the same shape, which of them to
    attend (each row and head must keep at least one). ``scale`` defaults to
    ``1 / sqrt(D)``.
    """
    if not HAVE_TRITON:
        raise RuntimeError("slot_attention needs triton: pip install triton")
    bsz, heads, q_len, dim = q.shape
    kv_heads = k.shape[1]
    if q_len != 1 or heads % kv_heads or k.shape[-1] != dim or v.shape[:3] != k.shape[:3] or v.shape[-1] != dim:
        raise ValueError(f"slot_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         "(one query; query heads a multiple of key-value heads; one head size)")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("slot_attention: the query's and the cache's head dimension must be contiguous")
    per_head = index.dim() == 3
    if index.shape != keep.shape or index.shape[0] != bsz or (per_head and index.shape[1] != heads) or index.dim() not in (2, 3):
        raise ValueError(f"slot_attention: index {tuple(index.shape)} and keep {tuple(keep.shape)} must both be "
                         f"[{bsz}, n] or [{bsz}, {heads}, n]")
    n = index.shape[-1]
    group = heads // kv_heads
    # a unit: the query heads that read one list of slots (a key-value head's group, or one query head)
    units, per_unit, units_per_kv = (heads, 1, group) if per_head else (kv_heads, group, 1)
    block_g = max(MIN_ROWS, triton.next_power_of_2(per_unit))
    block_d = max(16, triton.next_power_of_2(dim))
    chunks = triton.cdiv(n, BLOCK_N)
    scale = dim ** -0.5 if scale is None else scale
    index = index.contiguous()
    keep = keep.contiguous().view(torch.uint8) if keep.dtype == torch.bool else keep.contiguous()
    rows = bsz * units
    m = torch.empty((rows, chunks, block_g), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty((rows, chunks, block_g, block_d), dtype=torch.float32, device=q.device)
    _slot_partial_kernel[(rows, chunks)](
        q, k, v, index, keep, m, l, acc, units, per_unit, units_per_kv, n, chunks, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        index.stride(0), index.stride(1) if per_head else 0, keep.stride(0), keep.stride(1) if per_head else 0,
        D=dim, BLOCK_G=block_g, BLOCK_N=BLOCK_N, BLOCK_D=block_d, num_warps=4)
    out = torch.empty((bsz, 1, heads, dim), dtype=q.dtype, device=q.device)
    _slot_combine_kernel[(bsz * heads,)](
        m, l, acc, out, heads, per_unit, chunks, out.stride(0), out.stride(2),
        D=dim, BLOCK_G=block_g, BLOCK_C=max(2, triton.next_power_of_2(chunks)), BLOCK_D=block_d, num_warps=1)
    return out
