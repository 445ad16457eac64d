"""Perplexity of activation-sparse SmolLM2-135M against dense, for every method at 25/40/50/65% (CPU).

    PYTHONPATH=src python benchmarks/activation_quality.py [--levels 0.25,0.4,0.5,0.65] [--allocations uniform,greedy]

Each method calibrates per-site thresholds on the shipped calibration text
(16 x 512 tokens) and is evaluated on the shipped evaluation text (20,480
tokens, windows of 1024), the same for dense. Also reported: the sparsity
measured on the evaluation text (the calibration text is another domain,
so it drifts from the target). teal, wina and wina_fisher cut the inputs of
every attention and MLP projection; cats cuts the MLP's gate activations only.
The weight power of wina and wina_fisher (the score is ``|x_j| * ||W[:, j]|| ** p``,
W's rows weighted by the loss's Fisher information for wina_fisher) is chosen per
level on held-out calibration text (with uniform allocation), never on the
evaluation text; the chosen ``p`` is recorded. teal and wina also run with
greedy per-layer allocation (TEAL's: each layer's sites get different
sparsities, the layer's weight-weighted mean stays at the target; cats has one
site a layer, so greedy changes nothing there).

``--weight-powers 0.125,0.25,0.5,1`` also runs wina (uniform) at each fixed
``p``, to show how the evaluation text ranks the powers the calibration
chooses among (information only: it is never used to choose).
``--seeds 0,1,2`` calibrates every run once per seed (the seed draws the
calibration windows and the score samples) and compares the methods on the
mean perplexity over seeds; the spread over seeds shows how much of a
difference between methods one calibration draw can make.
``--weighted k_proj,gate_proj`` also runs wina (uniform) with only those
layers' scores weighted (the WINA authors' choice), at ``p`` = 1 and at the
calibrated ``p`` (information too).

Each finished run is appended to ``benchmarks/results/NAME.partial.jsonl``
(keyed by method, allocation, level, power, weighted layers, seed and
``--max-tokens``): an interrupted benchmark resumes where it stopped;
``--fresh`` starts over. The journal is removed once NAME.json is written.

Goal (issue 7): the weight-informed method no worse than plain thresholds
(teal) at every level, compared with the same allocation (on the mean over
seeds); a goal row for each weight-informed method run (wina, wina_fisher).
"""

from __future__ import annotations

import argparse
import statistics
import time

from sparsa.benchmarking import Journal, goal, print_goals, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="0.25,0.4,0.5,0.65")
    parser.add_argument("--methods", default="teal,wina,wina_fisher,cats")
    parser.add_argument("--allocations", default="uniform,greedy", help="uniform and/or greedy (greedy: teal and wina only)")
    parser.add_argument("--max-tokens", type=int, default=20480)
    parser.add_argument("--name", default="activation_quality")
    parser.add_argument("--weight-powers", default="",
                        help="also run wina (uniform) at these fixed powers p, e.g. 0.125,0.25,0.5,1: how the "
                             "evaluation text ranks them (for information; the goals use the calibrated p)")
    parser.add_argument("--weighted", default="",
                        help="also run wina (uniform) weighting only these layers' scores, e.g. k_proj,gate_proj "
                             "(for information), at p = 1 and at the calibrated p")
    parser.add_argument("--seeds", default="0", help="calibration seeds, comma-separated; goals compare the mean over them")
    parser.add_argument("--fresh", action="store_true", help="ignore the rows an interrupted run left in NAME.partial.jsonl")
    args = parser.parse_args()

    from sparsa.activations import apply
    from sparsa.data.text import shipped_text
    from sparsa.eval.perplexity import perplexity
    from sparsa.models import load_model

    lm = load_model()
    text = shipped_text("evaluation")

    def ppl():
        return perplexity(lm.model, lm.tokenizer, text, seq_len=1024, max_tokens=args.max_tokens, progress=False).perplexity

    def key(row):  # what a row was measured with
        only = row.get("weighted")
        return (row["method"], row["allocation"], row["target"], row["weight_power"] if row["fixed_power"] else None,
                tuple(only) if only else None, row.get("seed", 0), row["eval_tokens"])

    journal = Journal(args.name, key, fresh=args.fresh)
    dense_key = ("dense", None, 0.0, None, None, 0, args.max_tokens)
    if dense_key not in journal:
        t0 = time.perf_counter()
        journal.append({"method": "dense", "allocation": None, "target": 0.0, "weight_power": None, "fixed_power": False,
                        "weighted": None, "eval_tokens": args.max_tokens, "perplexity": ppl(), "seconds": time.perf_counter() - t0})
    dense = journal.done[dense_key]["perplexity"]
    print(f"dense perplexity {dense:.3f}", flush=True)
    rows = []
    levels = [float(v) for v in args.levels.split(",")]
    # (method, allocation, fixed weight power or None, weighted layers or None)
    runs = [(m, a, None, None) for a in args.allocations.split(",") for m in args.methods.split(",") if a == "uniform" or m != "cats"]
    runs += [("wina", "uniform", float(p), None) for p in args.weight_powers.split(",") if p]
    weighted = tuple(args.weighted.split(",")) if args.weighted else None
    runs += [("wina", "uniform", p, weighted) for p in (1.0, None)] if weighted else []

    def measure(method, allocation, level, power, only, seed) -> dict:
        t0 = time.perf_counter()
        options = ({} if power is None else {"weight_power": power}) | ({} if only is None else {"weighted": only})
        handle = apply(lm, method, level, allocation=allocation, seed=seed, **options)
        calibrate_s = time.perf_counter() - t0
        handle.start_tracking()
        value = ppl()
        row = {"method": method, "allocation": allocation, "target": level, "seed": seed, "perplexity": value,
               "ratio_to_dense": value / dense, "measured_sparsity": handle.measured_sparsity(),
               "measured_weight_sparsity": handle.measured_weight_sparsity(),
               "calibrate_s": calibrate_s, "weight_power": handle.config.weight_power if method.startswith("wina") else None,
               "fixed_power": power is not None, "weighted": list(only) if only else None, "seconds": time.perf_counter() - t0}
        handle.remove()
        shown = f", p={row['weight_power']}" if method.startswith("wina") else ""
        shown += f", weighted {'+'.join(only)}" if only else ""
        print(f"{method:5} {allocation:7} {level:.2f} seed {seed}: perplexity {value:8.3f} (x{value / dense:.2f}), measured sparsity "
              f"{row['measured_sparsity']:.3f} (weight-weighted {row['measured_weight_sparsity']:.3f}){shown} ({row['seconds']:.0f} s)", flush=True)
        return row

    seeds = [int(v) for v in args.seeds.split(",")]
    for method, allocation, power, only in runs:
        for level in levels:
            for seed in seeds:
                done = journal.done.get((method, allocation, level, power, only, seed, args.max_tokens))
                rows.append(done if done is not None else journal.append(
                    measure(method, allocation, level, power, only, seed) | {"eval_tokens": args.max_tokens}))

    def run_of(r):  # the (method, allocation, fixed power, weighted layers) a row came from
        only = r.get("weighted")
        return r["method"], r["allocation"], r["weight_power"] if r["fixed_power"] else None, tuple(only) if only else None

    def mean_ppl(run, level) -> float:  # over the seeds
        return statistics.mean(r["perplexity"] for r in rows if run_of(r) == run and r["target"] == level)

    print(f"\n{'method':40} " + " ".join(f"{int(l * 100):>7}%" for l in levels) + f"   (dense {dense:.3f})")
    for run in runs:
        method, allocation, power, only = run
        label = f"{method} {allocation}" + ("" if power is None else f" p={power:g}") + ("" if only is None else " " + "+".join(only))
        for seed in seeds if len(seeds) > 1 else ():
            print(f"{label + f' seed {seed}':40} " + " ".join(
                f"{r['perplexity']:8.2f}" for r in rows if run_of(r) == run and r.get("seed", 0) == seed))
        print(f"{label + (' mean' if len(seeds) > 1 else ''):40} " + " ".join(f"{mean_ppl(run, l):8.2f}" for l in levels))
    goals = []
    for allocation in args.allocations.split(","):
        for level in levels:
            teal = ("teal", allocation, None, None)
            for informed in ("wina", "wina_fisher"):
                if (informed, allocation, None, None) in runs and teal in runs:
                    goals.append(goal(f"{allocation}: {informed} / teal perplexity at {int(level * 100)}%"
                                      + (f", mean over seeds {args.seeds}" if len(seeds) > 1 else ""),
                                      mean_ppl((informed, allocation, None, None), level) / mean_ppl(teal, level), 1.0))
    write_results(args.name, {"model": lm.info.summary(), "dense_perplexity": dense, "eval_tokens": args.max_tokens, "rows": rows}, goals)
    journal.finish()
    print_goals(goals)


if __name__ == "__main__":
    main()
