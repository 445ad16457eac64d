"""Triton GEMV that skips the weight rows of inactive channels: ``y[M, N] = (x * keep)[M, K] @ W^T`` for 1 to 8 tokens.

With activation sparsity most input channels of a decode step are cut, and
channel ``k`` of ``x`` only ever meets column ``k`` of W. Stored transposed
once (``wt = W^T``, ``[K, N]`` row-major, i.e. W column-major), that column
is one contiguous row of ``wt``. The selection is fused: a channel is active
where ``|x_k| >= threshold_k`` (a per-channel threshold, which is how both a
plain magnitude cut and a weight-informed score ``|x_k| * ||W[:, k]||`` are
expressed), or where ``x_k != 0`` without thresholds.

Work split: a program owns ``BLOCK_N`` outputs of one token and a chunk of
``k_chunk`` channels, walked ``BLOCK_K`` rows at a time. Loads of ``wt`` are
masked by the active channels, and a masked-off row issues no memory
traffic, so the bytes read fall with the sparsity. Chunks make enough
programs to keep every SM's memory pipes busy at one token; their float32
partials are summed by a second small kernel that also adds the bias and
casts (deterministic, no atomics). With one chunk the first kernel writes
the output directly.
"""

from __future__ import annotations

import dataclasses

import torch

from ._triton import HAVE_TRITON, tl, triton

__all__ = ["MAX_TOKENS", "GemvConfig", "sparse_gemv", "transpose_weight"]

MAX_TOKENS = 8


if HAVE_TRITON:

    @triton.jit
    def _sparse_gemv_kernel(x_ptr, thr_ptr, wt_ptr, bias_ptr, out_ptr, N, K, k_chunk, stride_xm, stride_wk,
                            stride_os, stride_om, HAS_THR: tl.constexpr, HAS_BIAS: tl.constexpr,
                            DIRECT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        chunk = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        # a 2-D accumulator: rows are summed once at the end, not in every step
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        k_begin = chunk * k_chunk
        for k0 in range(k_begin, k_begin + k_chunk, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            if HAS_THR:
                active = tl.abs(x) >= tl.load(thr_ptr + offs_k, mask=k_ok, other=float("inf"))
                x = tl.where(active, x, 0.0)
            else:
                active = x != 0.0
            w = tl.load(wt_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :],
                        mask=active[:, None] & n_ok[None, :], other=0.0)
            acc += x[:, None] * w.to(tl.float32)
        total = tl.sum(acc, axis=0)
        if DIRECT:
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + m * stride_om + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_ok)
        else:
            tl.store(out_ptr + chunk * stride_os + m * stride_om + offs_n, total, mask=n_ok)

    @triton.jit
    def _sum_chunks_kernel(partial_ptr, bias_ptr, out_ptr, N, CHUNKS, stride_ps, stride_pm, stride_om,
                           HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.program_id(1)
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for s in range(0, CHUNKS):
            acc += tl.load(partial_ptr + s * stride_ps + m * stride_pm + offs_n, mask=n_ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """One launch configuration (the benchmark searches a grid of them)."""

    block_n: int = 128  # outputs per program
    block_k: int = 32  # channels per step
    k_chunk: int = 512  # channels per program
    num_warps: int = 4


def transpose_weight(weight: torch.Tensor) -> torch.Tensor:
    """``W [N, K]`` stored as ``W^T [K, N]`` contiguous (once, at load)."""
    return weight.detach().t().contiguous()


def sparse_gemv(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None = None, *,
                threshold: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """``(x * keep) [M, K] @ W^T (+ bias)`` reading only the rows of ``wt = W^T`` whose channel is active; ``M <= 8``.

    ``threshold`` (float32 ``[K]``) keeps channel ``k`` where ``|x_k| >= threshold[k]``;
    without it, the nonzero channels are active.
    """
    if not HAVE_TRITON:
        raise RuntimeError("the sparse GEMV kernel needs triton: pip install triton")
    m, k = x.shape
    if m > MAX_TOKENS or wt.shape[0] != k or x.dtype != wt.dtype or wt.stride(1) != 1:
        raise ValueError(f"sparse_gemv: x {tuple(x.shape)} {x.dtype} and wt {tuple(wt.shape)} {wt.dtype} do not fit "
                         f"(at most {MAX_TOKENS} tokens, wt = W^T contiguous, same dtype)")
    if threshold is not None and (threshold.shape != (k,) or threshold.dtype != torch.float32):
        raise ValueError(f"sparse_gemv: threshold must be float32 [{k}], got {tuple(threshold.shape)} {threshold.dtype}")
    c = config or GemvConfig()
    block_n, block_k, k_chunk = c.block_n, c.block_k, c.k_chunk
    n = wt.shape[1]
    x = x.contiguous()
    k_chunk = -(-min(k_chunk, k) // block_k) * block_k
    chunks = -(-k // k_chunk)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    direct = chunks == 1
    partial = out if direct else torch.empty((chunks, m, n), dtype=torch.float32, device=x.device)
    thr = threshold if threshold is not None else x  # unused pointer when HAS_THR is False
    b = bias if bias is not None else x
    _sparse_gemv_kernel[(triton.cdiv(n, block_n), m, chunks)](
        x, thr, wt, b, partial, n, k, k_chunk, x.stride(0), wt.stride(0),
        0 if direct else partial.stride(0), partial.stride(-2),
        HAS_THR=threshold is not None, HAS_BIAS=bias is not None, DIRECT=direct,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=c.num_warps)
    if not direct:
        _sum_chunks_kernel[(triton.cdiv(n, 256), m)](partial, b, out, n, chunks, partial.stride(0), partial.stride(1),
                                                     out.stride(0), HAS_BIAS=bias is not None, BLOCK_N=256, num_warps=4)
    return out
