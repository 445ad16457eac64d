"""Sustained 2:4 against dense at large M, with the GPU's SM clock and power read alongside (CUDA GPU).

    PYTHONPATH=src python benchmarks/clocks24.py [--phase-s 1.5] [--tokens 4096,16384] [--name clocks24]

``linear24.py`` times short bursts. Here each of dense cuBLAS and ours
(:class:`~sparsa.kernels.SparseLinear24`, which runs cuSPARSELt at these
sizes) runs back to back for ``--phase-s`` seconds, twice, alternating
(dense, ours, dense, ours), on the Llama-3-8B shapes, fp16 and bf16. While a
phase runs, a thread reads the SM clock, the board power and the reasons the
clock is held down (NVML, every 20 ms; the first 0.3 s of a phase is left out).
The question it answers: when a GPU is held at its power limit, do the sparse
tensor-core kernels run at a lower clock than dense ones, and how much of the
gap to 2x is that?

Reported per case: dense/ours time, the two mean SM clocks, and dense/ours
scaled by the clock ratio (what the ratio would be at equal clocks; a derived
figure, not a measurement). Goal row (issue 5's): the mean sustained
dense/ours at M >= 4096 against 1.5. Needs ``nvidia-ml-py`` (``pynvml``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from telemetry import Telemetry

from sparsa.benchmarking import goal, print_goals, write_results
from sparsa.kernels.bench_linear import DTYPES, SHAPES, rel_error
from sparsa.kernels.sparse24 import SparseLinear24, random_24_linear

def sustained(fn, seconds: float, telemetry: Telemetry) -> dict:
    """Run ``fn`` back to back for ``seconds``; its mean time per call (µs, device events) and the telemetry."""
    torch.cuda.synchronize()
    telemetry.start()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, t0, queued = 0, time.perf_counter(), None
    start.record()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            fn()
        calls += 10
        mark = torch.cuda.Event()
        mark.record()
        if queued is not None:  # wait for the chunk before: the host stays one chunk ahead, the GPU never idles
            queued.synchronize()
        queued = mark
    end.record()
    end.synchronize()
    return dict(telemetry.stop(), us=1000.0 * start.elapsed_time(end) / calls, calls=calls)


def measure(ours, w: torch.Tensor, m: int, phase_s: float, telemetry: Telemetry) -> dict:
    """One case: the error of ours, then dense and ours in alternating sustained phases."""
    x = torch.randn(m, w.shape[1], device="cuda", dtype=w.dtype)
    with torch.no_grad():
        path = ours.route(m)[0]  # the dispatch's measurement, outside the phases
        error = rel_error(ours(x), F.linear(x, w))
        phases = {"dense": [], "ours": []}
        for name in ("dense", "ours", "dense", "ours"):
            phases[name].append(sustained((lambda: F.linear(x, w)) if name == "dense" else (lambda: ours(x)), phase_s, telemetry))
            time.sleep(0.3)
    d, o = ({key: statistics.mean(p[key] for p in phases[name]) for key in ("us", "sm_mhz", "power_w")} for name in ("dense", "ours"))
    return dict(error_ours=error, correct=error < 1e-2, path=path, dense=d, ours=o, phases=phases,
                ratio=d["us"] / o["us"], clock_ratio=o["sm_mhz"] / d["sm_mhz"],
                ratio_at_equal_clock=d["us"] / o["us"] * d["sm_mhz"] / o["sm_mhz"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase-s", type=float, default=1.5, help="seconds each phase runs (two phases each for dense and ours)")
    parser.add_argument("--tokens", default="4096,16384", help="token counts M, comma-separated")
    parser.add_argument("--layers", default="qkv,o,gate_up,down", help="Llama-3-8B layers, comma-separated")
    parser.add_argument("--name", default="clocks24", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("clocks24.py needs a CUDA GPU")
    try:
        telemetry = Telemetry(torch.cuda.current_device())
    except ImportError:
        sys.exit("clocks24.py reads the GPU's clocks through NVML: pip install nvidia-ml-py (or the gpu extra: pip install -e .[gpu])")

    layers = {name.strip() for name in args.layers.split(",")}
    tokens = [int(t) for t in args.tokens.split(",")]
    cases = []
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}; {args.phase_s} s phases, dense and ours alternating")
    print(f"{'layer':8} {'dtype':5} {'M':>6} {'dense us':>9} {'ours us':>9} {'ratio':>6} {'dense MHz':>9} {'ours MHz':>9} "
          f"{'dense W':>7} {'ours W':>7} {'ratio at equal clock':>20}  clock held by")
    for layer, n, k in (s for s in SHAPES["8B"] if s[0] in layers):
        for dname, dtype in DTYPES.items():
            linear = random_24_linear(n, k, dtype, seed=n + k)
            w = linear.weight.detach()
            ours = SparseLinear24.from_linear(linear, f"8B.{layer}")
            for m in tokens:
                case = dict(model="8B", layer=layer, n=n, k=k, dtype=dname, m=m, **measure(ours, w, m, args.phase_s, telemetry))
                cases.append(case)
                d, o = case["dense"], case["ours"]
                held = sorted({r for p in case["phases"]["dense"] + case["phases"]["ours"] for r in p["reasons"]})
                print(f"{layer:8} {dname:5} {m:6} {d['us']:9.1f} {o['us']:9.1f} {case['ratio']:6.3f} {d['sm_mhz']:9.0f} "
                      f"{o['sm_mhz']:9.0f} {d['power_w']:7.0f} {o['power_w']:7.0f} {case['ratio_at_equal_clock']:20.3f}  "
                      f"{', '.join(held) or '-'}", flush=True)
            del linear, w, ours
            torch.cuda.empty_cache()
    big = [c for c in cases if c["m"] >= 4096]
    summary = {"mean_ratio": statistics.mean(c["ratio"] for c in big), "mean_clock_ratio": statistics.mean(c["clock_ratio"] for c in big),
               "mean_ratio_at_equal_clock": statistics.mean(c["ratio_at_equal_clock"] for c in big)}
    goals = [goal("sustained: mean dense/ours at M >= 4096", summary["mean_ratio"], 1.5, better="higher"),
             goal("cases wrong (relative error >= 1e-2)", sum(not c["correct"] for c in cases), 0, better="lower")]
    path = write_results(args.name, {"phase_s": args.phase_s, "summary": summary, "cases": cases}, goals)
    print(f"\nmean over {len(big)} cases: dense/ours {summary['mean_ratio']:.3f}, SM clock ours/dense "
          f"{summary['mean_clock_ratio']:.3f}, dense/ours at equal clock {summary['mean_ratio_at_equal_clock']:.3f}\nresults: {path}")
    print_goals(goals)


if __name__ == "__main__":
    main()
