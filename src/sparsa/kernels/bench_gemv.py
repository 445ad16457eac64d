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

__all__ = ["CALLS", "SHAPES", "dense_us", "gemv_calls", "gemv_row", "goals", "graph_us", "random_cut", "random_layer"]

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


def random_layer(n: int, k: int, seed: int, dtype: torch.dtype = torch.bfloat16, tokens: int = 1):
    """``tokens`` inputs and enough copies of a random ``(n, k)`` weight (with their transposes) that no call
    finds its weight in L2, as in a model; and the generator, for drawing cuts."""
    from .sparse_gemv import transpose_weight

    g = torch.Generator(device="cuda").manual_seed(seed)
    copies = max(2, math.ceil(L2_EVICT_BYTES / (n * k * dtype.itemsize)))
    ws = [(torch.randn(n, k, device="cuda", generator=g) * 0.02).to(dtype) for _ in range(copies)]
    x = torch.randn(tokens, k, device="cuda", generator=g).to(dtype)
    return x, ws, [transpose_weight(w) for w in ws], g


def random_cut(x, w, level: float, g):
    """Per-channel thresholds that cut ``level`` of the channels at random, the channels kept, and the float64
    reference product."""
    thr = torch.where(torch.rand(x.shape[-1], device="cuda", generator=g) < level, float("inf"), 0.0).float()
    keep = x.abs().float() >= thr
    return thr, keep, (x.double() * keep) @ w.double().T


def gemv_calls(x, wts, thr, config) -> list:
    """One sparse-GEMV call per weight copy (for :func:`graph_us`)."""
    from .sparse_gemv import sparse_gemv

    return [lambda wt=wt: sparse_gemv(x, wt, threshold=thr, config=config) for wt in wts]


def dense_us(x, ws) -> float:
    """Dense cuBLAS (``F.linear`` on the uncut input) per call, graph-timed over the weight copies."""
    return graph_us([lambda w=w: F.linear(x, w) for w in ws])


def gemv_row(x, ws, wts, thr, ref, config=None) -> dict:
    """Dense and sparse GEMV times (µs) and the sparse one's relative error vs float64, for one cut.

    ``config``: the launch configuration (None: the one a layer measures for itself, :mod:`.gemv_dispatch`).
    """
    from .gemv_dispatch import bucket, config_for
    from .sparse_gemv import GemvConfig, sparse_gemv

    n, k = ws[0].shape
    level = float(torch.isinf(thr).float().mean())
    config = config or config_for(n, k, bucket(x.shape[0]), x.dtype, level) or GemvConfig.for_shape(n, k)
    out = sparse_gemv(x, wts[0], threshold=thr, config=config)
    error = ((out.double() - ref).norm() / ref.norm()).item()
    dense = dense_us(x, ws)
    ours = graph_us(gemv_calls(x, wts, thr, config))
    return {"dense_us": dense, "ours_us": ours, "ours_speedup": dense / ours, "error": error,
            "config": config.key(), "weight_copies": len(ws)}


def goals(rows: list[dict]) -> list[dict]:
    """The goals of a table of :func:`gemv_row` rows: never slower than dense (3% allowed), exact to bf16."""
    from ..benchmarking import goal

    return [goal("min dense/ours over all rows", min(r["ours_speedup"] for r in rows), 0.97, better="higher"),
            goal("worst relative error vs float64", max(r["error"] for r in rows), 1e-2)]
