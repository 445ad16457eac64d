"""Triton GEMV that skips the weight rows of zero activations: ``y[M, N] = x[M, K] @ W^T`` for 1 to 8 tokens.

With activation sparsity most input channels of a decode step are zero, and
channel ``k`` of ``x`` only ever meets column ``k`` of W. Stored transposed
once (``wt = W^T``, ``[K, N]`` row-major, i.e. W column-major), that column
is one contiguous row of ``wt``. A program owns ``BLOCK_N`` outputs of one
token and walks K ``BLOCK_K`` channels at a time; the loads of ``wt`` are
masked by ``x != 0``, and a fully masked row issues no memory traffic, so
the bytes read fall with the sparsity. Split-K programs write float32
partials that are summed afterwards (deterministic, no atomics).
"""

from __future__ import annotations

import torch

from ._triton import HAVE_TRITON, tl, triton

__all__ = ["MAX_TOKENS", "sparse_gemv", "transpose_weight"]

MAX_TOKENS = 8


if HAVE_TRITON:

    @triton.jit
    def _sparse_gemv_kernel(x_ptr, wt_ptr, out_ptr, N, K, k_per_split, stride_xm, stride_wk, stride_os, stride_om,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        split = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        k_begin = split * k_per_split
        for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            active = x != 0.0
            w = tl.load(wt_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :],
                        mask=active[:, None] & n_ok[None, :], other=0.0)
            acc += tl.sum(x[:, None] * w.to(tl.float32), axis=0)
        tl.store(out_ptr + split * stride_os + m * stride_om + offs_n, acc, mask=n_ok)


def transpose_weight(weight: torch.Tensor) -> torch.Tensor:
    """``W [N, K]`` stored as ``W^T [K, N]`` contiguous (once, at load)."""
    return weight.detach().t().contiguous()


def sparse_gemv(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None = None, *, block_n: int = 128,
                block_k: int = 32, split_k: int = 1) -> torch.Tensor:
    """``x [M, K] @ W^T (+ bias)`` reading only the rows of ``wt = W^T`` whose channel is nonzero; ``M <= 8``."""
    if not HAVE_TRITON:
        raise RuntimeError("the sparse GEMV kernel needs triton: pip install triton")
    m, k = x.shape
    if m > MAX_TOKENS or wt.shape[0] != k or x.dtype != wt.dtype or wt.stride(1) != 1:
        raise ValueError(f"sparse_gemv: x {tuple(x.shape)} {x.dtype} and wt {tuple(wt.shape)} {wt.dtype} do not fit "
                         f"(at most {MAX_TOKENS} tokens, wt = W^T contiguous, same dtype)")
    n = wt.shape[1]
    x = x.contiguous()
    k_per_split = -(-k // (split_k * block_k)) * block_k
    splits = -(-k // k_per_split)
    partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), m, splits)
    _sparse_gemv_kernel[grid](x, wt, partial, n, k, k_per_split, x.stride(0), wt.stride(0), partial.stride(0),
                              partial.stride(1), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    out = partial[0] if splits == 1 else partial.sum(0)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
