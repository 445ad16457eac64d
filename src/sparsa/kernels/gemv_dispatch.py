"""Which launch configuration runs an activation-sparse GEMV: measured per shape, never guessed.

For a layer shape ``(N, K)``, dtype, token bucket (1, 2, 4 or 8 tokens) and
the cut's target sparsity (to the nearest 5%), every tile that
:func:`candidates` proposes is checked against the float64 product and
timed once on the device, on a random weight with a random cut at that
sparsity, and so is dense cuBLAS on the uncut input. Timing is the
benchmark's (:func:`sparsa.kernels.bench_gemv.graph_us`): calls captured in
a CUDA graph, cycling over enough copies of the weight that none is found
in L2, as a decode engine runs them (timed one call at a time instead, a
launch gap per kernel weighs on the two-kernel GEMV and a 3 µs layer reads
as 6-8 µs). The fastest tile is kept, with the times, in memory and on disk
(a :class:`~sparsa.kernels.decisions.DecisionCache`,
``gemv-<gpu-name>.json``)::

    "576x576:m1:bfloat16:s0.50": {"config": "n64-k64-w1",
                                  "times_us": {"n64-k64-w1": 3.0, ..., "dense": 3.3}, "speedup": 1.1, ...}

The chosen kernel still cuts the input: the cut is the model's numerics (the
perplexity measured with it), so a layer runs its fastest tile even where
that is slower than dense. Where it is, the decision says so and a warning
names the layer shape once.

During CUDA-graph capture nothing is measured: an unmeasured shape runs
:meth:`GemvConfig.for_shape` (not cached).
"""

from __future__ import annotations

import datetime as _dt
import warnings

import torch

from .bench_gemv import dense_us, gemv_calls, graph_us, random_cut, random_layer
from .decisions import DecisionCache, shape_key
from .sparse_gemv import MAX_TOKENS, GemvConfig, sparse_gemv

__all__ = ["BUCKETS", "bucket", "cache_path", "candidates", "config_for", "measure"]

BUCKETS = (1, 2, 4, 8)
FORMAT = 2  # 2: graph-timed, tiles only
TOLERANCE = 1e-2  # relative error against float64 that a configuration may show (fp16/bf16 rounding)


def _versions() -> dict:
    import triton

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}


_CACHE = DecisionCache("gemv", FORMAT, _versions, "activation-sparse GEMV")
cache_path = _CACHE.path
_WARNED: set[str] = set()


def bucket(m: int) -> int:
    """The measured token count that ``m`` (1 to 8) tokens use: the next power of two."""
    if not 1 <= m <= MAX_TOKENS:
        raise ValueError(f"the sparse GEMV runs 1 to {MAX_TOKENS} tokens, got {m}")
    return next(b for b in BUCKETS if m <= b)


def candidates(n: int, k: int) -> list[GemvConfig]:
    """The tiles timed for an ``(n, k)`` layer: the unmeasured default first, then the tiles that won some
    shape in the benchmark's wider search (``benchmarks/activation_speed.py``) or in a small model's layers."""
    tiles = ((64, 64, 1), (64, 128, 1), (32, 64, 1), (32, 128, 1), (32, 256, 2), (128, 64, 2), (64, 256, 2), (128, 128, 4))
    return list(dict.fromkeys([GemvConfig.for_shape(n, k), *(GemvConfig(bn, bk, w) for bn, bk, w in tiles)]))


def _level(sparsity: float) -> float:
    return round(min(max(sparsity, 0.0), 0.95) * 20) / 20


def measure(n: int, k: int, m_bucket: int, dtype: torch.dtype, sparsity: float) -> dict:
    """Time every candidate (and dense) for an ``(n, k)`` layer on the current CUDA device; the decision entry."""
    with torch.no_grad():
        x, ws, wts, gen = random_layer(n, k, n * 31 + k * 7 + m_bucket, dtype, m_bucket)
        thr, _, ref = random_cut(x, ws[0], sparsity, gen)
        times, errors = {}, {}
        for config in candidates(n, k):
            label = config.key()
            try:
                out = sparse_gemv(x, wts[0], threshold=thr, config=config)
                err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                if not err < TOLERANCE:
                    errors[label] = f"relative error {err:.3g}"
                    continue
                times[label] = graph_us(gemv_calls(x, wts, thr, config))
            except Exception as exc:  # noqa: BLE001 - a configuration that fails here is skipped, and recorded
                errors[label] = f"{type(exc).__name__}: {exc}"[:300]
        times["dense"] = dense_us(x, ws)
        del ws, wts
    sparse = {label: t for label, t in times.items() if label != "dense"}
    best = min(sparse, key=sparse.get) if sparse else GemvConfig.for_shape(n, k).key()
    return {"config": best, "times_us": {label: round(t, 3) for label, t in times.items()},
            "speedup": round(times["dense"] / sparse[best], 4) if sparse else None, "errors": errors,
            "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def config_for(n: int, k: int, m_bucket: int, dtype: torch.dtype, sparsity: float) -> GemvConfig | None:
    """The measured (cached) configuration for an ``(n, k)`` layer cut at ``sparsity``; None while a CUDA graph
    is being captured and the shape is not measured yet (the caller runs the default, uncached)."""
    level = _level(sparsity)
    key = f"{shape_key(n, k, m_bucket, dtype)}:s{level:.2f}"
    entry = _CACHE.get(key)
    if entry is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        entry = measure(n, k, m_bucket, dtype, level)
        _CACHE.put(key, entry)
    speedup = entry.get("speedup")
    if speedup is not None and speedup < 1.0 and key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"sparsa: the activation-sparse GEMV of a {n}x{k} {str(dtype).replace('torch.', '')} layer at "
                      f"{m_bucket} token(s) and {level:.0%} sparsity runs at {speedup:.2f}x of dense on this "
                      "GPU; it still cuts the input (the model's numerics)", RuntimeWarning, stacklevel=2)
    return GemvConfig.from_key(entry["config"])
