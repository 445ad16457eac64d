"""2:4 sparse linear layers vs dense cuBLAS on a CUDA GPU, at Llama-3 shapes and 1..16384 tokens.

    PYTHONPATH=src python benchmarks/linear24.py [--quick] [--budget-s 300] [--name linear24]
    PYTHONPATH=src python benchmarks/linear24.py --summarize A.json B.json ...   # one table over several runs

Shapes: Llama-3-8B (fused qkv 6144x4096, o 4096x4096, fused gate+up
28672x4096, down 4096x14336) and Llama-3-70B (10240x8192, 8192x8192,
57344x8192, 8192x28672); float16 and bfloat16; M in 1, 16, 64, 128, 1024,
4096, 16384. What is measured and how: :mod:`sparsa.kernels.bench_linear`
(dense cuBLAS, torch's stock semi-structured path, and ours, timed in
alternating rounds, and since 2026-12-04 also with their calls interleaved).

Goals (issue 5): the minimum of dense/ours over all cases >= 0.97 (never
slower than dense, within noise); the mean at M >= 4096 >= 1.5; the
geometric mean over shapes at M = 1 >= 1.3; all timed in rounds. The mean at
M >= 4096 is also given as a goal of its own with the calls interleaved. Cases
left out by the time budget are listed under ``skipped`` and excluded from
the goals.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from sparsa.benchmarking import goal, print_goals, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 8B o and down, M in 1, 64, 4096, both dtypes")
    parser.add_argument("--budget-s", type=float, default=300.0, help="start no new shape after this many seconds")
    parser.add_argument("--rep-ms", type=float, default=30.0, help="GPU time (ms) per measurement: each function's, split over 3 rounds; "
                        "and all functions' together for the interleaved timing")
    parser.add_argument("--name", default="linear24", help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument("--skip-70b-16k", action="store_true", help="leave out the 70B shapes at 16384 tokens")
    parser.add_argument("--models", default="8B,70B", help="which models' shapes, comma-separated (8B, 70B)")
    parser.add_argument("--layers", default="qkv,o,gate_up,down", help="which layers, comma-separated (qkv, o, gate_up, down)")
    parser.add_argument("--summarize", nargs="+", metavar="JSON",
                        help="print the summary and goals over the cases of these result files (no GPU; a later "
                             "file's case replaces an earlier one of the same model, layer, dtype and M)")
    parser.add_argument("--tokens", default=None, help="token counts M, comma-separated (default: 1,16,64,128,1024,4096,16384)")
    args = parser.parse_args()
    if args.summarize:
        return summarize_files(args.summarize)
    if not torch.cuda.is_available():
        sys.exit("linear24.py needs a CUDA GPU")
    import triton

    from sparsa.kernels import cusparselt_available, dispatch
    from sparsa.kernels.bench_linear import DTYPES, SHAPES, TOKENS, format_case, format_header, run_shape
    from sparsa.kernels.cusparselt import library_version

    warnings.filterwarnings("ignore", message=".*semi.?structured.*")
    warnings.filterwarnings("ignore", message=".*prototype.*")
    wanted = {m.strip().upper() for m in args.models.split(",")}
    if not wanted <= set(SHAPES):
        sys.exit(f"--models: choose from {', '.join(SHAPES)}")
    layers = {name.strip() for name in args.layers.split(",")}
    shapes = [(m, *s) for m, group in SHAPES.items() for s in group if m in wanted and s[0] in layers]
    tokens = TOKENS if args.tokens is None else tuple(int(t) for t in args.tokens.split(","))
    if args.quick:
        shapes = [("8B", "o", 4096, 4096), ("8B", "down", 4096, 14336)]
        tokens = (1, 64, 4096)
    started = time.perf_counter()
    cases, skipped = [], []
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}, "
          f"cuSPARSELt {library_version() if cusparselt_available() else 'NO'}; dispatch cache {dispatch.cache_path()}", flush=True)
    print(format_header(), flush=True)
    for model, layer, n, k in shapes:
        for dname in DTYPES:
            todo = [m for m in tokens if not (args.skip_70b_16k and model == "70B" and m == 16384)]
            skipped += [dict(model=model, layer=layer, n=n, k=k, dtype=dname, m=m, why="--skip-70b-16k")
                        for m in tokens if m not in todo]
            if time.perf_counter() - started > args.budget_s:
                skipped += [dict(model=model, layer=layer, n=n, k=k, dtype=dname, m=m, why="time budget") for m in todo]
                continue
            for case in run_shape(model, layer, n, k, dname, todo, args.rep_ms):
                cases.append(case)
                print(format_case(case), flush=True)
            finish(cases, skipped, args, started, final=False)
    finish(cases, skipped, args, started, final=True)


def summarize_files(paths: list[str]) -> None:
    import json

    from sparsa.kernels.bench_linear import format_summary, summarize

    cases = {}
    for path in paths:
        doc = json.loads(open(path).read())
        print(f"{path}: {doc['device']}, {doc['date']}, {len(doc['cases'])} cases")
        for c in doc["cases"]:
            cases[(c["model"], c["layer"], c["dtype"], c["m"])] = c
    s = summarize(list(cases.values()))
    print("\n".join(format_summary(s)))
    print(f"{s['cases']} cases: min {s['min_ratio']:.3f}, mean at M >= 4096 {s['mean_ratio_m_ge_4096']:.3f}, "
          f"geomean at M = 1 {s['geomean_ratio_m1']:.3f}")


def goals_for(s: dict) -> list[dict]:
    """Issue 5's goals for the linear layers, from :func:`~sparsa.kernels.bench_linear.summarize`'s summary."""
    return [
        goal("min dense/ours over all cases", s["min_ratio"], 0.97, better="higher"),
        goal("mean dense/ours at M >= 4096", s["mean_ratio_m_ge_4096"], 1.5, better="higher"),
        *([goal("mean dense/ours at M >= 4096, calls interleaved", s["mean_ratio_m_ge_4096_interleaved"], 1.5, better="higher")]
          if s.get("mean_ratio_m_ge_4096_interleaved") is not None else []),
        goal("geomean dense/ours at M = 1", s["geomean_ratio_m1"], 1.3, better="higher"),
        goal("cases wrong (relative error >= 1e-2) or failed", s["wrong"], 0, better="lower"),
    ]


def finish(cases, skipped, args, started, final: bool) -> None:
    from sparsa.kernels.bench_linear import format_summary, summarize

    s = summarize(cases)
    goals = goals_for(s)
    payload = {
        "complete": final, "quick": args.quick, "models": args.models, "layers": args.layers, "tokens": args.tokens, "elapsed_s": round(time.perf_counter() - started, 1),
        "summary": s, "skipped": skipped, "cases": cases,
    }
    path = write_results(args.name, payload, goals)
    if not final:
        return
    print("\n" + "\n".join(format_summary(s)))
    if skipped:
        kinds = sorted({"%s M=%d (%s)" % (c["model"], c["m"], c["why"]) for c in skipped})
        print(f"skipped {len(skipped)} cases: " + ", ".join(kinds))
    print(f"results: {path} ({s['cases']} cases, {payload['elapsed_s']:.0f} s)")
    print_goals(goals)


if __name__ == "__main__":
    main()
