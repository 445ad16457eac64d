"""Does sparsa's cuSPARSELt algorithm search pick the fastest configuration? Checked against all of them.

    PYTHONPATH=src python benchmarks/cslt_search.py [--models 8B] [--tokens 4096,16384] [--name cslt_search]

For each Llama-3 layer shape, dtype and token count: a fresh 2:4 weight runs
sparsa's search (:meth:`sparsa.kernels.cusparselt.CsltWeight._search`), and a
re-run of the single pass sparsa searched with until 2026-12-04 (each id in
turn, five calls timed back to back with CUDA events, the median). The reference then
times every configuration id the way the dispatcher and ``linear24.py`` judge
a path (L2 flushed before each call), all ids' calls interleaved so that they
meet the same clocks (:func:`sparsa.kernels.timing.time_each`). Each pick's
time over the fastest id's is its loss.

Goals: the search's pick within 2% of the fastest id in every case, and
within 1% on average.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from sparsa.benchmarking import cuda_median_ms, goal, print_goals, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="8B", help="which models' shapes, comma-separated (8B, 70B)")
    parser.add_argument("--tokens", default="4096,16384", help="token counts M, comma-separated (multiples of 8)")
    parser.add_argument("--budget-ms", type=float, default=800.0,
                        help="GPU time for the reference: every id's calls interleaved (at least 5 calls each)")
    parser.add_argument("--name", default="cslt_search", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cslt_search.py needs a CUDA GPU")
    from sparsa.kernels import cusparselt_available
    from sparsa.kernels.bench_linear import DTYPES, SHAPES
    from sparsa.kernels.cusparselt import MAX_CONFIGS, Algorithm, CsltError, CsltWeight, PreparedMatmul, library_version
    from sparsa.kernels.sparse24 import random_24
    from sparsa.kernels.timing import time_each

    if not cusparselt_available():
        sys.exit("cslt_search.py needs cuSPARSELt")
    wanted = {m.strip().upper() for m in args.models.split(",")}
    tokens = [int(t) for t in args.tokens.split(",")]
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, cuSPARSELt {library_version()}", flush=True)
    print(f"{'model':5} {'layer':8} {'dtype':5} {'M':>6} {'ids':>4} {'best':>6} {'best us':>9} "
          f"{'search':>7} {'loss':>6} {'1-pass':>7} {'loss':>6}", flush=True)
    started, cases = time.perf_counter(), []
    for model, group in SHAPES.items():
        if model not in wanted:
            continue
        for layer, n, k in group:
            for dname, dtype in DTYPES.items():
                w = CsltWeight(random_24(n, k, dtype, seed=n + k, device="cuda"))
                for m in tokens:
                    x = torch.randn(m, k, device=device, dtype=dtype)
                    t0 = time.perf_counter()
                    w.matmul(x)  # sparsa's search, for bucket m
                    search_s = time.perf_counter() - t0
                    picked = w.algorithm_for(m).key()
                    prepared = {}
                    for config_id in range(MAX_CONFIGS):  # the ids the search tries
                        call = PreparedMatmul(w, x, m, Algorithm(config_id))
                        if call.plan.algorithm.config_id != config_id:
                            continue  # it fell back to id 0: no such id for this problem
                        try:
                            call(x)  # the status check, as the search makes it
                        except CsltError:
                            continue
                        prepared[call.plan.algorithm.key()] = call
                    one_pass = {key: cuda_median_ms(lambda c=call: c(x), reps=5, warmup=1) for key, call in prepared.items()}
                    old_pick = min(one_pass, key=one_pass.get)
                    ref = time_each({key: (lambda c=call: c(x)) for key, call in prepared.items()}, device,
                                    budget_ms=args.budget_ms)
                    best = min(ref, key=ref.get)
                    case = dict(model=model, layer=layer, n=n, k=k, dtype=dname, m=m, ids=len(ref), best=best,
                                best_us=round(ref[best], 2), search=picked, search_loss=ref[picked] / ref[best],
                                search_s=round(search_s, 2), finalists_us=w.search_us.get(m),
                                one_pass=old_pick, one_pass_loss=ref[old_pick] / ref[best],
                                reference_us={key: round(t, 2) for key, t in sorted(ref.items(), key=lambda kv: kv[1])})
                    cases.append(case)
                    print(f"{model:5} {layer:8} {dname:5} {m:6d} {len(ref):4d} {best:>6.6} {ref[best]:9.1f} "
                          f"{picked:>7.7} {case['search_loss']:6.3f} {old_pick:>7.7} {case['one_pass_loss']:6.3f}", flush=True)
                    del prepared, x
                del w
                torch.cuda.empty_cache()
    losses = [c["search_loss"] for c in cases]
    old = [c["one_pass_loss"] for c in cases]
    goals = [
        goal("max over cases: time of the search's pick / fastest id", max(losses), 1.02),
        goal("mean over cases: time of the search's pick / fastest id", statistics.mean(losses), 1.01),
    ]
    summary = {"cases": len(cases), "search_loss_max": max(losses), "search_loss_mean": statistics.mean(losses),
               "one_pass_loss_max": max(old), "one_pass_loss_mean": statistics.mean(old)}
    path = write_results(args.name, {"models": args.models, "tokens": args.tokens, "budget_ms": args.budget_ms,
                                     "elapsed_s": round(time.perf_counter() - started, 1), "summary": summary,
                                     "cases": cases}, goals)
    print(f"\nsearch: loss max {summary['search_loss_max']:.3f}, mean {summary['search_loss_mean']:.4f}; "
          f"one pass: max {summary['one_pass_loss_max']:.3f}, mean {summary['one_pass_loss_mean']:.4f}")
    print(f"results: {path}")
    print_goals(goals)


if __name__ == "__main__":
    main()
