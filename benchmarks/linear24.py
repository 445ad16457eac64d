"""2:4 sparse linear layers vs dense cuBLAS on a CUDA GPU, at Llama-3 shapes and 1..16384 tokens.

    PYTHONPATH=src python benchmarks/linear24.py [--quick] [--budget-s 300] [--name linear24]

For every layer shape (Llama-3-8B: fused qkv 6144x4096, o 4096x4096, fused
gate+up 28672x4096, down 4096x14336; Llama-3-70B: 10240x8192, 8192x8192,
57344x8192, 8192x28672), dtype (float16, bfloat16) and token count M (1, 16,
64, 128, 1024, 4096, 16384), on a random 2:4 weight:

* dense: ``F.linear`` on the 2:4 weight stored dense (cuBLAS);
* stock: torch's ``to_sparse_semi_structured`` weight through ``F.linear``;
* ours: ``SparseLinear24`` with its measured dispatch (Triton kernel,
  cuSPARSELt or dense per token bucket); the dispatch is measured before
  timing (its cost is reported as ``tune_s``).

Each output is first checked against the dense product (relative error);
then each is timed with ``triton.testing.do_bench`` (median; L2 flushed
before every call), inputs rotating over several copies. Times are GPU
times: Python launch overhead overlaps the L2 flush and is not counted.
Ratios are dense time / other time (> 1: faster than dense).

Goals (issue 5): the minimum of dense/ours over all cases >= 0.97 (never
slower than dense, within noise); the mean at M >= 4096 >= 1.5; the
geometric mean over shapes at M = 1 >= 1.3. Cases left out by the time
budget are listed under ``skipped`` and excluded from the goals.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from sparsa.benchmarking import goal, print_goals, write_results

SHAPES = {
    "8B": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
    "70B": [("qkv", 10240, 8192), ("o", 8192, 8192), ("gate_up", 57344, 8192), ("down", 8192, 28672)],
}
TOKENS = (1, 16, 64, 128, 1024, 4096, 16384)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
X_BYTES = 1 << 30  # rotating inputs: as many copies as fit in this (2 to 4)


def random_24(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A random 2:4 weight on the GPU (two of every four inputs kept, chosen at random)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.empty(n, k, device="cuda", dtype=dtype)
    step = 4096
    for start in range(0, n, step):
        rows = min(step, n - start)
        block = torch.randn(rows, k, generator=g, device="cuda").mul_(0.02)
        keep = torch.rand(rows, k // 4, 4, generator=g, device="cuda").argsort(dim=2)[..., :2]
        mask = torch.zeros(rows, k // 4, 4, dtype=torch.bool, device="cuda").scatter_(2, keep, True)
        w[start : start + rows] = (block * mask.reshape(rows, k)).to(dtype)
    return w


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


class Rotating:
    """Calls ``fn`` on the next of several input copies, so no call finds its input in cache."""

    def __init__(self, xs, fn):
        self.xs, self.fn, self.i = xs, fn, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.xs)
        return self.fn(self.xs[self.i])


def bench(fn, rep_ms: float) -> float:
    from triton.testing import do_bench

    return 1000.0 * do_bench(fn, warmup=max(2, rep_ms // 4), rep=rep_ms, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 8B o and down, M in 1, 64, 4096, both dtypes")
    parser.add_argument("--budget-s", type=float, default=300.0, help="start no new case after this many seconds")
    parser.add_argument("--rep-ms", type=float, default=20.0, help="do_bench repetition time per measurement")
    parser.add_argument("--name", default="linear24", help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument("--skip-70b-16k", action="store_true", help="leave out the 70B shapes at 16384 tokens")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("linear24.py needs a CUDA GPU")
    import triton  # noqa: F401  (do_bench; and the kernels need it)

    from sparsa.kernels import SparseLinear24, cusparselt_available
    from sparsa.kernels import dispatch

    warnings.filterwarnings("ignore", message=".*semi.?structured.*")
    warnings.filterwarnings("ignore", message=".*prototype.*")
    shapes = [(m, *s) for m, group in SHAPES.items() for s in group]
    tokens = TOKENS
    if args.quick:
        shapes = [("8B", "o", 4096, 4096), ("8B", "down", 4096, 14336)]
        tokens = (1, 64, 4096)
    started = time.perf_counter()
    cases, skipped = [], []
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}, "
          f"cuSPARSELt {'yes' if cusparselt_available() else 'NO'}; dispatch cache {dispatch.cache_path()}", flush=True)
    print(f"{'model':5} {'layer':8} {'N x K':>12} {'dtype':5} {'M':>6} {'dense us':>10} {'ours us':>10} {'path':>10} "
          f"{'dense/ours':>10} {'stock us':>10} {'dense/stock':>11}", flush=True)

    for model, layer_name, n, k in shapes:
        for dname, dtype in DTYPES.items():
            todo = [m for m in tokens if not (args.skip_70b_16k and model == "70B" and m == 16384)]
            skipped += [dict(model=model, layer=layer_name, n=n, k=k, dtype=dname, m=m, why="--skip-70b-16k")
                        for m in tokens if m not in todo]
            if time.perf_counter() - started > args.budget_s:
                skipped += [dict(model=model, layer=layer_name, n=n, k=k, dtype=dname, m=m, why="time budget") for m in todo]
                continue
            weight = random_24(n, k, dtype, seed=n + k)
            linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
            del weight
            w = linear.weight.detach()
            t0 = time.perf_counter()
            try:
                ours = SparseLinear24.from_linear(linear, f"{model}.{layer_name}")
            except Exception as exc:  # noqa: BLE001
                cases += [dict(model=model, layer=layer_name, n=n, k=k, dtype=dname, m=m, correct=False,
                               error=f"from_linear: {type(exc).__name__}: {exc}"[:500]) for m in todo]
                print(f"{model} {layer_name} {dname}: FAILED to build: {exc}", flush=True)
                continue
            build_s = time.perf_counter() - t0
            try:
                from torch.sparse import to_sparse_semi_structured

                stock_w = to_sparse_semi_structured(w)
                stock_error = None
            except Exception as exc:  # noqa: BLE001 - recorded, the case goes on without it
                stock_w, stock_error = None, f"{type(exc).__name__}: {exc}"[:200]
            for m in todo:
                if time.perf_counter() - started > args.budget_s:
                    skipped.append(dict(model=model, layer=layer_name, n=n, k=k, dtype=dname, m=m, why="time budget"))
                    continue
                case = dict(model=model, layer=layer_name, n=n, k=k, dtype=dname, m=m, build_s=round(build_s, 3))
                try:
                    run_case(case, ours, w, stock_w, stock_error, args.rep_ms)
                except Exception as exc:  # noqa: BLE001 - one failing case is recorded, the others still run
                    case.update(correct=False, error=f"{type(exc).__name__}: {exc}"[:500])
                    torch.cuda.empty_cache()
                cases.append(case)
                print(format_case(case), flush=True)
            ours = stock_w = linear = w = None  # free this shape's weights before the next
            torch.cuda.empty_cache()
            finish(cases, skipped, args, started, final=False)
    finish(cases, skipped, args, started, final=True)


def run_case(case: dict, ours, w, stock_w, stock_error, rep_ms: float) -> None:
    """Check, then time dense, ours and stock at ``case['m']`` tokens; results go into ``case``."""
    from sparsa.kernels import dispatch

    m, k, dtype = case["m"], case["k"], w.dtype
    copies = max(2, min(4, X_BYTES // (m * k * 2)))
    xs = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(copies)]
    with torch.no_grad():
        t0 = time.perf_counter()
        path, config, alg = ours.route(m)  # measures the dispatch for this bucket (once)
        case["tune_s"] = round(time.perf_counter() - t0, 3)
        case.update(path=path, triton_config=None if config is None else config.key(), cslt_alg_id=alg)
        plan = dispatch.plan_for(ours, dispatch.bucket(m))
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
        case["dense_us"] = bench(Rotating(xs, lambda x: F.linear(x, w)), rep_ms)
        case["ours_us"] = bench(Rotating(xs, ours), rep_ms)
        if stock_w is not None and "stock_error" not in case:
            case["stock_us"] = bench(Rotating(xs, lambda x: F.linear(x, stock_w)), rep_ms)
    case["ratio_ours"] = case["dense_us"] / case["ours_us"]
    case["ratio_stock"] = case["dense_us"] / case["stock_us"] if "stock_us" in case else None


def format_case(c: dict) -> str:
    head = f"{c['model']:5} {c['layer']:8} {str(c['n']) + 'x' + str(c['k']):>12} {c['dtype']:5} {c['m']:6d}"
    if "ratio_ours" not in c:
        return f"{head}  FAILED: {c.get('error', '?')}"
    stock = f"{c['stock_us']:10.1f} {c['ratio_stock']:10.2f}x" if c.get("stock_us") else f"{'-':>10} {'-':>11}"
    flag = "" if c["correct"] else f"  WRONG (error {c['error_ours']:.3g})"
    return (f"{head} {c['dense_us']:10.1f} {c['ours_us']:10.1f} {c['path']:>10} {c['ratio_ours']:9.2f}x {stock}{flag}")


def summarize(cases: list[dict]) -> dict:
    ok = [c for c in cases if c.get("correct") and "ratio_ours" in c]
    ratios = [c["ratio_ours"] for c in ok]
    large = [c["ratio_ours"] for c in ok if c["m"] >= 4096]
    one = [c["ratio_ours"] for c in ok if c["m"] == 1]
    stock = [c["ratio_stock"] for c in ok if c.get("ratio_stock")]
    by_m = {}
    for m in sorted({c["m"] for c in ok}):
        r = [c["ratio_ours"] for c in ok if c["m"] == m]
        s = [c["ratio_stock"] for c in ok if c["m"] == m and c.get("ratio_stock")]
        by_m[m] = {
            "ours_min": min(r), "ours_geomean": math.exp(sum(map(math.log, r)) / len(r)), "ours_max": max(r),
            "stock_min": min(s) if s else None, "stock_max": max(s) if s else None,
        }
    return {
        "cases": len(cases), "wrong": len(cases) - len(ok),
        "min_ratio": min(ratios) if ratios else float("nan"),
        "mean_ratio_m_ge_4096": sum(large) / len(large) if large else float("nan"),
        "geomean_ratio_m1": math.exp(sum(map(math.log, one)) / len(one)) if one else float("nan"),
        "stock_min_ratio": min(stock) if stock else None, "stock_max_ratio": max(stock) if stock else None,
        "by_tokens": by_m,
    }


def finish(cases, skipped, args, started, final: bool) -> None:
    s = summarize(cases)
    goals = [
        goal("min dense/ours over all cases", s["min_ratio"], 0.97, better="higher"),
        goal("mean dense/ours at M >= 4096", s["mean_ratio_m_ge_4096"], 1.5, better="higher"),
        goal("geomean dense/ours at M = 1", s["geomean_ratio_m1"], 1.3, better="higher"),
        goal("cases wrong (relative error >= 1e-2) or failed", s["wrong"], 0, better="lower"),
    ]
    payload = {
        "complete": final, "quick": args.quick, "elapsed_s": round(time.perf_counter() - started, 1),
        "summary": s, "skipped": skipped, "cases": cases,
    }
    path = write_results(args.name, payload, goals)
    if not final:
        return
    print("\nper token count (dense/ours min / geomean / max; stock min..max):")
    for m, r in s["by_tokens"].items():
        stock = f"{r['stock_min']:.2f}..{r['stock_max']:.2f}" if r["stock_min"] is not None else "-"
        print(f"  M={m:6d}: {r['ours_min']:.2f} / {r['ours_geomean']:.2f} / {r['ours_max']:.2f}; stock {stock}")
    if skipped:
        kinds = sorted({"%s M=%d (%s)" % (c["model"], c["m"], c["why"]) for c in skipped})
        print(f"skipped {len(skipped)} cases: " + ", ".join(kinds))
    print(f"results: {path} ({s['cases']} cases, {payload['elapsed_s']:.0f} s)")
    print_goals(goals)


if __name__ == "__main__":
    main()
