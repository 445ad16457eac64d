"""Time the activation-sparse GEMV against dense cuBLAS, as a decode engine runs it.

Used by ``sparsa bench activations`` and ``benchmarks/activation_speed.py``.
One token, bf16, a random ``(n, k)`` weight with a given fraction of its
input channels cut at random. Both are captured in a CUDA graph (``CALLS``
calls a replay) that cycles over enough copies of the weight that no call
finds its weight in L2, as in a model. Outputs are checked against float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..benchmarking import cuda_median_ms

__all__ = ["CALLS", "SHAPES", "gemv_calls", "gemv_row", "graph_us", "random_cut", "random_layer"]

SHAPES = {  # (label, out, in) of the linears whose inputs decoding cuts
    "8B": [("q/o", 4096, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)],
    "70B": [("q/o", 8192, 8192), ("gate/up", 28672, 8192), ("down", 8192, 28672)],
}
CALLS = 20  # calls per graph replay
L2_EVICT_BYTES = 150_000_000  # three times an H100's L2


def graph_us(fns) -> float:
    """Microseconds per call: ``CALLS`` calls cycling over ``fns``, captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fns[i % len(fns)]()
    return 1000.0 * cuda_median_ms(graph.replay, reps=15, warmup=3) / CALLS


def random_layer(n: int, k: int, seed: int):
    """A token and enough copies of a random ``(n, k)`` weight (with their transposes) that no call finds its
    weight in L2, as in a model; and the generator, for drawing cuts."""
    from .sparse_gemv import transpose_weight

    g = torch.Generator(device="cuda").manual_seed(seed)
    copies = max(2, math.ceil(L2_EVICT_BYTES / (n * k * 2)))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=g)
    return x, ws, [transpose_weight(w) for w in ws], g


def random_cut(x, w, level: float, g):
    """Per-channel thresholds that cut ``level`` of the channels at random, and the float64 reference product."""
    thr = torch.where(torch.rand(x.shape[-1], device="cuda", generator=g) < level, float("inf"), 0.0).float()
    keep = x.abs().float() >= thr
    return thr, keep, (x.double() * keep) @ w.double().T


def gemv_calls(x, wts, thr, config) -> list:
    """One sparse-GEMV call per weight copy (for :func:`graph_us`)."""
    from .sparse_gemv import sparse_gemv

    return [lambda wt=wt: sparse_gemv(x, wt, threshold=thr, config=config) for wt in wts]


def gemv_row(x, ws, wts, thr, ref, config=None) -> dict:
    """Dense and sparse GEMV times (µs) and the sparse one's relative error vs float64, for one cut."""
    from .sparse_gemv import GemvConfig, sparse_gemv

    n, k = ws[0].shape
    config = config or GemvConfig.for_shape(n, k)
    out = sparse_gemv(x, wts[0], threshold=thr, config=config)
    error = ((out.double() - ref).norm() / ref.norm()).item()
    dense_us = graph_us([lambda w=w: F.linear(x, w) for w in ws])
    ours_us = graph_us(gemv_calls(x, wts, thr, config))
    return {"dense_us": dense_us, "ours_us": ours_us, "ours_speedup": dense_us / ours_us, "error": error,
            "config": vars(config), "weight_copies": len(ws)}
