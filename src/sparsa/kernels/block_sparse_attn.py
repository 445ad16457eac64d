"""A Triton block-sparse causal attention kernel (prefill) over sparsa's block-mask format.

One program owns one query block of one (batch, head) and walks only the key
blocks its mask keeps, listed in ``kv_indices[b, h, qb, :kv_counts[b, h, qb]]``.
It keeps a running maximum and normaliser (the online softmax of
FlashAttention), so memory is one query block's accumulator: nothing of size
``L x L`` exists. Causality is applied element-wise (only the diagonal block
ever needs it). A mask block's queries may be split over several programs
(``block_m``) and its keys walked ``inner`` at a time. On GPUs with TMA
(Hopper on) queries, keys and values are read through tensor descriptors over
``[B, H, L, D]``, which also zero-fills keys past the end. Grouped-query heads read their key-value head
``h // (H / Hkv)``. Queries arrive padded to whole blocks and aligned so that
row 0 sits at absolute position ``first`` (a multiple of the block size);
keys are not padded (loads are masked).

Triton is imported here only, and guarded, like the 2:4 kernels.
"""

from __future__ import annotations

import functools
import math

import torch

from ._triton import HAVE_TRITON, TensorDescriptor, row_tile, tl, triton

__all__ = ["HAVE_TRITON", "block_sparse_attention", "kept_block_lists"]

LOG2E = 1.4426950408889634  # scores in log2 units: exp2 instead of exp


if HAVE_TRITON:

    @triton.jit
    def _attend_block(q, k_src, v_src, b, kvh, start, q_pos, m_i, l_i, acc, LK, skm, svm, dims, qk_scale,
                      INNER: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr):
        """``INNER`` keys from ``start`` in the online softmax, in log2 units (exp2 is the cheaper instruction).

        ``k_src``/``v_src`` are TMA descriptors over ``[B, Hkv, Lk, D]`` (keys past Lk read as 0), or the
        head's base pointers.
        """
        cols = start + tl.arange(0, INNER)
        c_ok = cols < LK
        if TMA:
            k = k_src.load([b, kvh, start, 0]).reshape(INNER, BLOCK_D)
            v = v_src.load([b, kvh, start, 0]).reshape(INNER, BLOCK_D)
        elif CAUSAL or D != BLOCK_D:  # the diagonal block (the only one that can pass the last key), or a padded head
            ok = c_ok[:, None] & (dims < D)[None, :]
            k = tl.load(k_src + cols[:, None] * skm + dims[None, :], mask=ok, other=0.0)
            v = tl.load(v_src + cols[:, None] * svm + dims[None, :], mask=ok, other=0.0)
        else:
            k = tl.load(k_src + cols[:, None] * skm + dims[None, :])
            v = tl.load(v_src + cols[:, None] * svm + dims[None, :])
        s = tl.dot(q, tl.trans(k))  # [BLOCK_M, INNER] float32, unscaled
        if CAUSAL:
            s = tl.where(c_ok[None, :] & (cols[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)  # log2 units
        m_use = m_new
        if CAUSAL:  # only here can a row have seen nothing yet
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - m_use[:, None])  # one fused multiply-add per score
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # accumulated in place on the tensor cores
        return m_new, l_i, acc

    @triton.jit
    def _block_sparse_attn_kernel(
        q_src, k_src, v_src, o_src, counts_ptr, indices_ptr,
        H, KV_GROUP, QB, LQ, LK, FIRST, qk_scale,
        sqb, sqh, sqm, skb, skh, skm, svb, svh, svm, sob, soh, som,
        scb, sch, sib, sih, siq,
        D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, INNER: tl.constexpr,
        TMA: tl.constexpr, KV_MAJOR: tl.constexpr,
    ):
        # The last (longest) query blocks start first: the causal tail balances. A mask block of BLOCK queries
        # may be split over BLOCK / BLOCK_M programs, and each key block is taken INNER keys at a time.
        SPLIT: tl.constexpr = BLOCK // BLOCK_M
        SUB: tl.constexpr = BLOCK // INNER
        tiles = QB * SPLIT
        pid = tl.program_id(0)
        if KV_MAJOR:
            # programs running together share one key-value head (its heads vary fastest, then the query
            # tiles), so the key and value blocks they read come from L2 rather than from memory
            group = pid % KV_GROUP
            rest = pid // KV_GROUP
            row_tile = tiles - 1 - rest % tiles
            bkv = rest // tiles
            b = bkv // (H // KV_GROUP)
            kvh = bkv % (H // KV_GROUP)
            h = kvh * KV_GROUP + group
        else:  # all heads vary fastest
            heads = tl.num_programs(0) // tiles  # B * H
            b = pid % heads // H
            h = pid % H
            row_tile = tiles - 1 - pid // heads
            kvh = h // KV_GROUP
        qb = row_tile // SPLIT
        rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # padded query rows
        dims = tl.arange(0, BLOCK_D)
        if TMA:  # descriptors over [B, H, L, D]
            q = q_src.load([b, h, row_tile * BLOCK_M, 0]).reshape(BLOCK_M, BLOCK_D)
            k_head = k_src
            v_head = v_src
        else:
            q = tl.load(q_src + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :],
                        mask=(rows < LQ)[:, None] & (dims < D)[None, :], other=0.0)
            k_head = k_src + b * skb + kvh * skh
            v_head = v_src + b * svb + kvh * svh
        q_pos = FIRST + rows  # absolute positions
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        count = tl.load(counts_ptr + b * scb + h * sch + qb)
        index_row = indices_ptr + b * sib + h * sih + qb * siq
        # kept blocks are listed ascending and end with the diagonal block: only that one needs the causal test
        for n in range(0, (count - 1) * SUB):
            start = tl.load(index_row + n // SUB) * BLOCK + (n % SUB) * INNER
            m_i, l_i, acc = _attend_block(q, k_head, v_head, b, kvh, start, q_pos, m_i, l_i, acc, LK, skm, svm, dims,
                                          qk_scale, INNER, D, BLOCK_D, False, TMA)
        if count > 0:
            diagonal = tl.load(index_row + count - 1) * BLOCK
            for sub in tl.static_range(SUB):
                m_i, l_i, acc = _attend_block(q, k_head, v_head, b, kvh, diagonal + sub * INNER, q_pos, m_i, l_i, acc,
                                              LK, skm, svm, dims, qk_scale, INNER, D, BLOCK_D, True, TMA)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        if TMA:
            o_src.store([b, h, row_tile * BLOCK_M, 0], out.to(o_src.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
        else:
            tl.store(o_src + b * sob + h * soh + rows[:, None] * som + dims[None, :], out.to(o_src.dtype.element_ty),
                     mask=(rows < LQ)[:, None] & (dims < D)[None, :])


if HAVE_TRITON:

    @triton.jit
    def _kept_lists_kernel(blocks_ptr, counts_ptr, indices_ptr, R, KB, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        rows, cols, inside, offsets = row_tile(R, KB, ROWS, BLOCK_N)
        kept = tl.load(blocks_ptr + offsets, mask=inside, other=0).to(tl.int32)
        rank = tl.cumsum(kept, axis=1)  # 1-based rank of each kept block
        count = tl.sum(kept, axis=1)
        tl.store(counts_ptr + rows, count, mask=rows < R)
        # each kept block writes its index at its rank; the slots past the count get 0 (disjoint stores)
        row_base = indices_ptr + rows[:, None].to(tl.int64) * KB
        tl.store(row_base + rank - 1, cols[None, :] + 0 * rows[:, None], mask=inside & (kept != 0))
        tl.store(row_base + cols[None, :], tl.zeros_like(kept), mask=inside & (cols[None, :] >= count[:, None]))


def kept_block_lists(blocks: torch.Tensor, rows_per_program: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's input format from a bool ``[..., QB, KB]`` mask on the GPU: ``counts [..., QB]`` and
    ``indices [..., QB, KB]`` (int32; each row's kept key blocks ascending, then zeros), in one launch."""
    if not HAVE_TRITON:
        raise RuntimeError("kept_block_lists needs triton: pip install triton")
    kb = blocks.shape[-1]
    flat = blocks.reshape(-1, kb).contiguous()
    counts = torch.empty(flat.shape[0], dtype=torch.int32, device=blocks.device)
    indices = torch.empty(flat.shape, dtype=torch.int32, device=blocks.device)
    if flat.numel():
        _kept_lists_kernel[(triton.cdiv(flat.shape[0], rows_per_program),)](
            flat, counts, indices, flat.shape[0], kb, ROWS=rows_per_program, BLOCK_N=max(16, triton.next_power_of_2(kb)))
    return counts.reshape(blocks.shape[:-1]), indices.reshape(blocks.shape)


@functools.lru_cache(maxsize=None)
def _major(device: int | None) -> int:
    """The GPU's compute capability major (asked once per device: the query costs more than a small launch)."""
    return torch.cuda.get_device_capability(device)[0]


def _tma_ready(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need a power-of-two head dim and 16-byte aligned rows (and a GPU that has TMA)."""
    if not all(t.is_cuda for t in tensors) or _major(tensors[0].device.index) < 9:
        return False
    d = tensors[0].shape[-1]
    return (d & (d - 1)) == 0 and 16 <= d <= 256 and all(
        t.stride(-1) == 1 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1]) and t.data_ptr() % 16 == 0
        for t in tensors)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor,
                           indices: torch.Tensor, block: int, first: int, scale: float | None = None, *,
                           num_warps: int | None = None, num_stages: int = 2, block_m: int | None = None,
                           inner: int | None = None, tma: bool | None = None, kv_major: bool = True) -> torch.Tensor:
    """Causal attention of block-aligned ``q [B, H, Lq', D]`` over ``k, v [B, Hkv, Lk, D]``, kept blocks only.

    ``counts [B, H, QB]`` and ``indices [B, H, QB, KB]`` (int32) list each
    query block's key blocks; ``first`` is the absolute position of q's row 0.
    ``block_m`` (a divisor of ``block``, at least 16): query rows per program;
    ``inner``: keys per step; ``tma``: load through TMA descriptors (default:
    where the GPU and the layout allow); ``kv_major``: launch the programs of
    one key-value head together (their key blocks stay in L2) rather than all
    heads' programs for the same query block.
    Returns ``[B, H, Lq', D]`` in q's dtype.
    """
    if not HAVE_TRITON:
        raise RuntimeError("the block-sparse attention kernel needs triton: pip install triton")
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    block_m = block_m or block
    if h % hkv or block not in (16, 32, 64, 128) or lq % block or first % block or block % block_m or block_m < 16:
        raise ValueError(f"block-sparse attention: q {tuple(q.shape)}, k {tuple(k.shape)}, block {block}, "
                         f"block_m {block_m}, first {first} do not fit")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # the lists may be expanded over rows and heads (stride 0): the kernel reads them through their strides
    counts, indices = (t.to(torch.int32) for t in (counts, indices))
    counts, indices = (t if t.stride(-1) == 1 else t.contiguous() for t in (counts, indices))
    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(d))
    tma = _tma_ready(q, k, v, out) if tma is None else tma
    # measured on an H100 at 64k tokens, blocks of 128: TMA loads of 64 keys at a time under 4 warps
    inner = inner or (min(64, block) if tma else block)
    if block % inner or inner < 16:
        raise ValueError(f"block-sparse attention: inner {inner} must divide block {block} and be at least 16")
    if tma:
        srcs = [TensorDescriptor.from_tensor(t, [1, 1, rows, block_d]) for t, rows in ((q, block_m), (k, inner), (v, inner), (out, block_m))]
    else:
        srcs = [q, k, v, out]
    grid = (b * h * (lq // block_m),)
    _block_sparse_attn_kernel[grid](
        *srcs, counts, indices,
        h, h // hkv, lq // block, lq, lk, first, (1.0 / math.sqrt(d) if scale is None else scale) * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        counts.stride(0), counts.stride(1), indices.stride(0), indices.stride(1), indices.stride(2),
        D=d, BLOCK=block, BLOCK_M=block_m, BLOCK_D=block_d, INNER=inner, TMA=tma, KV_MAJOR=kv_major,
        num_warps=num_warps or (4 if tma or block_m <= 64 else 8), num_stages=num_stages,
    )
    return out
