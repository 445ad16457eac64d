"""Measure 2:4 linear layers against dense cuBLAS and torch's stock path, side by side.

Used by ``sparsa bench linear`` and ``benchmarks/linear24.py``. For one layer
shape, dtype and token count M, on a random 2:4 weight:

* dense: ``F.linear`` on the 2:4 weight stored dense (cuBLAS);
* stock: torch's ``to_sparse_semi_structured`` weight through ``F.linear``;
* ours: :class:`~sparsa.kernels.SparseLinear24` with its measured dispatch
  (measured before timing; its cost is ``tune_s``).

Each output is first checked against the dense product (relative error).
Then the three are timed with the dispatcher's timer (L2 flushed by a read
before every call, inputs rotating over several copies), two ways, in an
order that alternates from case to case:

* in rounds (``dense_us``, ``ours_us``, ``stock_us``, ``ratio_ours``): a
  block of calls of each (dense, ours, stock, dense, ...), three rounds,
  each keeping its fastest round's median. Each meets the clock its own
  calls leave, as a model running only such layers would; but the clock
  drifts between blocks (on an H200 a block's median moved by up to 15%
  from one pass to the next, ``cslt_search.py``).
* interleaved (``interleaved_us``, ``ratio_ours_interleaved``; since
  2026-12-04): one call of each in turn, the order rotating, each one's
  median (:func:`~sparsa.kernels.timing.time_each`, as the cuSPARSELt
  search times its finalists), so that all three meet the same clocks.
  Under a power cap that is a clock set by the mix: on an H200 ours runs
  held at a clock 2.7% below dense's when each runs alone
  (``clocks24_h200.json``), so the mix can favour ours.

Ratios are dense time / other time (> 1: faster).
"""

from __future__ import annotations

import math
import statistics
import time
import zlib

import torch
import torch.nn.functional as F

__all__ = ["SHAPES", "TOKENS", "DTYPES", "format_case", "format_header", "format_summary", "rel_error", "run_shape", "summarize"]

SHAPES = {
    "8B": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
    "70B": [("qkv", 10240, 8192), ("o", 8192, 8192), ("gate_up", 57344, 8192), ("down", 8192, 28672)],
}
TOKENS = (1, 16, 64, 128, 1024, 4096, 16384)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
X_BYTES = 1 << 30  # rotating inputs: as many copies as fit in this (2 to 4)
ROUNDS = 3


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


class _Rotating:
    """Calls ``fn`` on the next of several input copies, so no call finds its input in cache."""

    def __init__(self, xs, fn):
        self.xs, self.fn, self.i = xs, fn, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.xs)
        return self.fn(self.xs[self.i])


def _bench(fn, rep_ms: float) -> float:
    from .timing import time_us

    return time_us(fn, torch.device("cuda"), budget_ms=rep_ms)


def time_interleaved(fns: dict, rep_ms: float) -> dict[str, float]:
    """The median (µs) of each function, their calls interleaved (``rep_ms``: GPU time for one call of each, repeated)."""
    from .timing import time_each

    return time_each(fns, torch.device("cuda"), budget_ms=rep_ms)


def time_side_by_side(fns: dict, rep_ms: float, rounds: int = ROUNDS) -> dict[str, float]:
    """The fastest per-round median (µs) of each function, timed in alternating rounds."""
    best = {name: math.inf for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], _bench(fn, rep_ms / rounds))
    return best


def run_shape(model: str, layer: str, n: int, k: int, dname: str, tokens, rep_ms: float = 20.0, stock: bool = True):
    """Yield one result dict per token count for a random 2:4 ``(n, k)`` layer (built once)."""
    from . import dispatch
    from .sparse24 import SparseLinear24, random_24_linear

    linear = random_24_linear(n, k, DTYPES[dname], seed=n + k)
    w = linear.weight.detach()
    base = dict(model=model, layer=layer, n=n, k=k, dtype=dname)
    t0 = time.perf_counter()
    try:
        ours = SparseLinear24.from_linear(linear, f"{model}.{layer}")
    except Exception as exc:  # noqa: BLE001 - recorded per case, the run goes on
        for m in tokens:
            yield dict(base, m=m, correct=False, error=f"from_linear: {type(exc).__name__}: {exc}"[:500])
        return
    build_s = time.perf_counter() - t0
    stock_w, stock_error = None, None
    if stock:
        try:
            from torch.sparse import to_sparse_semi_structured

            stock_w = to_sparse_semi_structured(w)
        except Exception as exc:  # noqa: BLE001 - recorded, the case goes on without it
            stock_error = f"{type(exc).__name__}: {exc}"[:200]
    for m in tokens:
        case = dict(base, m=m, build_s=round(build_s, 3), paths=list(ours.available_paths()))
        try:
            _run_case(case, ours, w, stock_w, stock_error, rep_ms, dispatch)
        except Exception as exc:  # noqa: BLE001 - one failing case is recorded, the others still run
            case.update(correct=False, error=f"{type(exc).__name__}: {exc}"[:500])
            torch.cuda.empty_cache()
        yield case
    del ours, stock_w, linear, w
    torch.cuda.empty_cache()


def _run_case(case: dict, ours, w, stock_w, stock_error, rep_ms: float, dispatch) -> None:
    m, k, dtype = case["m"], case["k"], w.dtype
    copies = max(2, min(4, X_BYTES // (m * k * 2)))
    xs = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(copies)]
    with torch.no_grad():
        t0 = time.perf_counter()
        path, config, algorithm = ours.route(m)  # measures the dispatch for this bucket (once)
        case["tune_s"] = round(time.perf_counter() - t0, 3)
        case.update(path=path, triton_config=None if config is None else config.key(),
                    cslt_algorithm=None if algorithm is None else algorithm.key())
        plan = dispatch.plan_for(ours, dispatch.bucket(m))
        if getattr(ours, "cslt", None) is not None and dispatch.bucket(m) in ours.cslt.search_us:
            case["cslt_search_us"] = ours.cslt.search_us[dispatch.bucket(m)]  # the search's finalists
        case["dispatch_us"] = {p: (None if not math.isfinite(t) else round(t, 2)) for p, t in plan.times_us.items()}
        if plan.errors:
            case["dispatch_errors"] = plan.errors
        ref = F.linear(xs[0], w)
        case["error_ours"] = rel_error(ours(xs[0]), ref)
        if stock_w is not None:
            try:
                case["error_stock"] = rel_error(F.linear(xs[0], stock_w), ref)
            except Exception as exc:  # noqa: BLE001
                case["stock_error"] = f"{type(exc).__name__}: {exc}"[:200]
        elif stock_error:
            case["stock_error"] = stock_error
        del ref
        case["correct"] = case["error_ours"] < 1e-2
        fns = {"dense": _Rotating(xs, lambda x: F.linear(x, w)), "ours": _Rotating(xs, ours)}
        if stock_w is not None and "stock_error" not in case:
            fns["stock"] = _Rotating(xs, lambda x: F.linear(x, stock_w))
        interleaved_first = zlib.crc32(f"{case['model']} {case['layer']} {case['dtype']} {m}".encode()) % 2 == 1
        if interleaved_first:
            together = time_interleaved(fns, rep_ms)
        rounds = time_side_by_side(fns, rep_ms)
        if not interleaved_first:
            together = time_interleaved(fns, rep_ms)
    for name, t in rounds.items():
        case[f"{name}_us"] = t
    case["ratio_ours"] = case["dense_us"] / case["ours_us"]
    case["ratio_stock"] = case["dense_us"] / case["stock_us"] if "stock_us" in case else None
    case["interleaved_us"] = {name: round(t, 2) for name, t in together.items()}
    case["ratio_ours_interleaved"] = together["dense"] / together["ours"]
    case["timed_first"] = "interleaved" if interleaved_first else "rounds"


def format_header() -> str:
    return (f"{'model':5} {'layer':8} {'N x K':>12} {'dtype':5} {'M':>6} {'dense us':>10} {'ours us':>10} {'path':>10} "
            f"{'dense/ours':>10} {'interl.':>7} {'stock us':>10} {'dense/stock':>11}")


def format_case(c: dict) -> str:
    head = f"{c['model']:5} {c['layer']:8} {str(c['n']) + 'x' + str(c['k']):>12} {c['dtype']:5} {c['m']:6d}"
    if "ratio_ours" not in c:
        return f"{head}  FAILED: {c.get('error', '?')}"
    stock = f"{c['stock_us']:10.1f} {c['ratio_stock']:10.2f}x" if c.get("stock_us") else f"{'-':>10} {'-':>11}"
    flag = "" if c["correct"] else f"  WRONG (error {c['error_ours']:.3g})"
    together = f"{c['ratio_ours_interleaved']:6.2f}x" if "ratio_ours_interleaved" in c else f"{'-':>7}"
    return f"{head} {c['dense_us']:10.1f} {c['ours_us']:10.1f} {c['path']:>10} {c['ratio_ours']:9.2f}x {together} {stock}{flag}"


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def summarize(cases: list[dict]) -> dict:
    """Minimum, per-token-count and headline ratios over the correct cases."""
    ok = [c for c in cases if c.get("correct") and "ratio_ours" in c]
    ratios = [c["ratio_ours"] for c in ok]
    large = [c["ratio_ours"] for c in ok if c["m"] >= 4096]
    large_together = [c["ratio_ours_interleaved"] for c in ok if c["m"] >= 4096 and "ratio_ours_interleaved" in c]
    stock = [c["ratio_stock"] for c in ok if c.get("ratio_stock")]
    by_m = {}
    for m in sorted({c["m"] for c in ok}):
        r = [c["ratio_ours"] for c in ok if c["m"] == m]
        s = [c["ratio_stock"] for c in ok if c["m"] == m and c.get("ratio_stock")]
        by_m[m] = {"ours_min": min(r), "ours_geomean": _geomean(r), "ours_max": max(r),
                   "stock_min": min(s) if s else None, "stock_max": max(s) if s else None}
    return {
        "cases": len(cases), "wrong": len(cases) - len(ok),
        "min_ratio": min(ratios) if ratios else float("nan"),
        "mean_ratio_m_ge_4096": statistics.mean(large) if large else float("nan"),
        # over the same cases only: a file from before 2026-12-04 has no interleaved timing
        "mean_ratio_m_ge_4096_interleaved": statistics.mean(large_together) if large and len(large_together) == len(large) else None,
        "geomean_ratio_m1": _geomean([c["ratio_ours"] for c in ok if c["m"] == 1]),
        "stock_min_ratio": min(stock) if stock else None, "stock_max_ratio": max(stock) if stock else None,
        "by_tokens": by_m,
    }


def format_summary(s: dict) -> list[str]:
    lines = ["per token count (dense/ours min / geomean / max; stock min..max):"]
    for m, r in s["by_tokens"].items():
        stock = f"{r['stock_min']:.2f}..{r['stock_max']:.2f}" if r["stock_min"] is not None else "-"
        lines.append(f"  M={m:6d}: {r['ours_min']:.2f} / {r['ours_geomean']:.2f} / {r['ours_max']:.2f}; stock {stock}")
    if s.get("mean_ratio_m_ge_4096_interleaved") is not None:
        lines.append(f"mean at M >= 4096: {s['mean_ratio_m_ge_4096']:.3f} in rounds, {s['mean_ratio_m_ge_4096_interleaved']:.3f} interleaved")
    return lines
