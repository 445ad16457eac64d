"""Do two training runs trace the same loss curve? (one GPU vs two, issue 9)

    torchrun --nproc_per_node 1 benchmarks/recovery.py --device cuda --name recovery_gpu1 [...]
    torchrun --nproc_per_node 2 benchmarks/recovery.py --device cuda --name recovery_gpu2 [...]
    PYTHONPATH=src python benchmarks/loss_curves_agree.py recovery_gpu1 recovery_gpu2

Reads both results files, compares their loss curves step by step, and
saves ``NAME.json`` with the largest relative difference of the losses and
the goal that it stays within noise (2%): the global batch is the same, only
split over processes, so the curves should agree up to reduction order.
"""

from __future__ import annotations

import argparse
import json

from sparsa.benchmarking import RESULTS, goal, print_goals, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("one")
    parser.add_argument("two")
    parser.add_argument("--name", default="recovery_gpus")
    args = parser.parse_args()
    a, b = (json.loads((RESULTS / f"{n}.json").read_text()) for n in (args.one, args.two))
    curve_a, curve_b = ([p["loss"] if isinstance(p, dict) else p for p in d["loss_curve"]] for d in (a, b))
    steps = min(len(curve_a), len(curve_b))
    diffs = [abs(x - y) / abs(x) for x, y in zip(curve_a[:steps], curve_b[:steps])]
    worst = max(diffs)
    print(f"{args.one} ({a['processes']} process(es)) vs {args.two} ({b['processes']}): {steps} steps, "
          f"largest relative loss difference {worst:.2e}; final losses {curve_a[steps - 1]:.4f} vs {curve_b[steps - 1]:.4f}")
    goals = [goal("largest relative difference of the loss curves", worst, 0.02),
             goal("relative difference of the final perplexities", abs(b["perplexity"]["recovered"] / a["perplexity"]["recovered"] - 1), 0.02)]
    write_results(args.name, {"runs": [args.one, args.two], "processes": [a["processes"], b["processes"]], "steps": steps,
                              "relative_differences": diffs, "curves": [curve_a[:steps], curve_b[:steps]],
                              "perplexity": [a["perplexity"], b["perplexity"]]}, goals)
    print_goals(goals)


if __name__ == "__main__":
    main()
