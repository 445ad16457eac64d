"""Time sparse attention on a GPU: dense SDPA, the backends on a block mask, and each pattern's estimation.

Used by ``sparsa bench attention`` and ``benchmarks/attention_speed.py``.
Queries, keys and values are random (bf16, batch 1); a pattern's estimate
runs on them exactly as in a model (random inputs spread attention evenly, so
threshold patterns keep most blocks: their *estimation* time is the point,
the density is reported). Times are CUDA-event medians.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..benchmarking import cuda_median_ms
from .backends import attend
from .base import PatternBase
from .masks import BlockMask, causal_blocks, finalize

__all__ = ["dense_ms", "pattern_row", "random_inputs", "random_mask", "relative_error", "time_backend"]


def random_inputs(length: int, heads: int, kv_heads: int, dim: int, seed: int = 0):
    """``q [1, heads, L, dim]``, ``k, v [1, kv_heads, L, dim]``, bf16 on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, heads, length, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, kv_heads, length, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, kv_heads, length, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


def random_mask(length: int, heads: int, block: int, sparsity: float, seed: int = 1) -> BlockMask:
    """Keep ``1 - sparsity`` of all L x L blocks, drawn from the causal ones (plus the diagonal)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    causal = causal_blocks(length, length, block, "cuda")
    p = (1.0 - sparsity) * causal.numel() / float(causal.sum())
    keep = (torch.rand((1, heads, *causal.shape), generator=g, device="cuda") < p) & causal
    return finalize(keep, length, length, block)


def dense_ms(q, k, v) -> float:
    return cuda_median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1]))


def relative_error(q, k, v, mask: BlockMask, out: torch.Tensor, blocks: int = 4) -> float:
    """Relative error of ``out`` on the last query blocks, against the reference backend in float32."""
    rows = blocks * mask.block_size
    sub = BlockMask(mask.blocks[:, :, -blocks:], mask.block_size, rows, mask.k_len)
    ref = attend(q[:, :, -rows:].float(), k.float(), v.float(), sub, backend="reference")
    return ((out[:, :, -rows:].float() - ref).norm() / ref.norm()).item()


def time_backend(q, k, v, mask: BlockMask, backend: str, **launch) -> tuple[float, float]:
    """(median ms, relative error) of ``backend`` on ``mask``."""
    out = attend(q, k, v, mask, backend=backend, **launch)
    error = relative_error(q, k, v, mask, out)
    return cuda_median_ms(lambda: attend(q, k, v, mask, backend=backend, **launch)), error


def pattern_row(q, k, v, pattern: PatternBase, dense: float, backends=("flex", "triton")) -> dict:
    """A pattern's estimation time, the density it chose, and the best backend's time on its mask."""
    expanded = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    row = {"estimate_ms": cuda_median_ms(lambda: pattern.mask(q, expanded), reps=7)}
    mask = pattern.mask(q, expanded)
    del expanded
    row["density"] = mask.density()
    row["attend_ms"] = min(cuda_median_ms(lambda b=b: attend(q, k, v, mask, backend=b)) for b in backends)
    row["estimate_over_dense"] = row["estimate_ms"] / dense
    row["speedup_with_estimate"] = dense / (row["estimate_ms"] + row["attend_ms"])
    return row
