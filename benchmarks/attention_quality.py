"""Long-context accuracy of every sparse-attention pattern against dense, on real models (CPU is enough).

    PYTHONPATH=src python benchmarks/attention_quality.py [--model default|gemma3-270m] [--lengths 4096]
        [--examples 2] [--tasks needle,multikey,...] [--name attention_quality]

For each model and length, every task (needle, multikey, multivalue,
variable_tracking, common_words; our seeded generators) is answered greedily
with dense attention and with each pattern at two settings. Sparse attention
applies to prompts of at least ``--min-len`` keys (all of them here) and, for
Gemma-3, only to its full-attention layers (its sliding-window layers are
already local). Reported per configuration: the mean exact-match score, the
score per task, and the measured block density (kept / causal blocks, mean
over layers and examples). Results are appended to a JSONL as each
configuration finishes (an interrupted run resumes) and summarised into
``benchmarks/results/NAME.json``.

Goal (ours): at its sparser setting each prefill pattern keeps at least 90%
of the dense score on the tasks the dense model solves.
"""

from __future__ import annotations

import argparse
import time

from sparsa.benchmarking import Journal, goal, print_goals, write_results

CONFIGS = [  # (label, method, settings): two settings per pattern, denser first
    ("dense", None, {}),
    ("streaming 1+16", "streaming", dict(sink_blocks=1, local_blocks=16)),
    ("streaming 1+8", "streaming", dict(sink_blocks=1, local_blocks=8)),
    ("vertical_slash 1024/1024", "vertical_slash", dict(vertical=1024, slash=1024)),
    ("vertical_slash 256/256", "vertical_slash", dict(vertical=256, slash=256)),
    ("antidiagonal 0.95", "antidiagonal", dict(threshold=0.95)),
    ("antidiagonal 0.9", "antidiagonal", dict(threshold=0.9)),
    ("flexprefill 0.95", "flexprefill", dict(coverage=0.95)),
    ("flexprefill 0.9", "flexprefill", dict(coverage=0.9)),
    ("quest 32 pages", "quest", dict(pages=32)),
    ("quest 16 pages", "quest", dict(pages=16)),
]
TASKS = ("needle", "multikey", "multivalue", "variable_tracking", "common_words")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="default (SmolLM2-135M), gemma3-270m, or a model path")
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--configs", default=None, help="comma-separated labels to run (default: all)")
    parser.add_argument("--min-len", type=int, default=1024)
    parser.add_argument("--name", default="attention_quality")
    args = parser.parse_args()

    from sparsa.attention import apply, remove
    from sparsa.eval.longctx import evaluate_longctx
    from sparsa.models import load_model

    lm = load_model(None if args.model == "default" else args.model)
    lengths = [int(v) for v in args.lengths.split(",")]
    tasks = [t for t in args.tasks.split(",") if t]
    configs = [c for c in CONFIGS if args.configs is None or c[0] in args.configs.split(",")]
    journal = Journal(args.name, key=lambda row: (row["model"], row["config"], tuple(row["lengths"])))
    attn = [m for _, m in lm.model.named_modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]
    print(f"{lm.info.name}: lengths {lengths}, tasks {tasks}, {args.examples} examples each", flush=True)
    for label, method, settings in configs:
        if (lm.info.name, label, tuple(lengths)) in journal:
            continue
        remove(lm.model)
        if method is not None:
            apply(lm.model, method, min_len=args.min_len, **settings)
        densities = []

        def record(row, densities=densities):
            values = [float(m.sparsa_last_density) for m in attn if getattr(m, "sparsa_last_density", None) is not None]
            row["density"] = sum(values) / len(values) if values else 1.0
            densities.append(row["density"])
            for m in attn:
                m.sparsa_last_density = None

        t0 = time.perf_counter()
        result = evaluate_longctx(lm.model, lm.tokenizer, tasks, lengths, n=args.examples, on_example=record)
        scores = [r["score"] for r in result["examples"]]
        row = {"model": lm.info.name, "config": label, "method": method, "settings": settings, "lengths": lengths,
               "mean_score": sum(scores) / len(scores), "scores": result["scores"],
               "density": sum(densities) / len(densities), "seconds": time.perf_counter() - t0,
               "examples": result["examples"]}
        journal.append(row)
        print(f"{label:28} score {row['mean_score']:.3f}  density {row['density']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    remove(lm.model)
    report(args, lm.info.name, [journal.done[(lm.info.name, c[0], tuple(lengths))] for c in configs
                                      if (lm.info.name, c[0], tuple(lengths)) in journal], tasks, lengths)


def report(args, model_name: str, rows: list[dict], tasks: list[str], lengths: list[int]) -> None:
    dense = next(r for r in rows if r["method"] is None)
    print(f"\n{model_name}, lengths {lengths}: exact-match score (mean over tasks and examples) and block density")
    print(f"{'config':28} {'score':>6} {'density':>8} " + " ".join(f"{t[:10]:>10}" for t in tasks))
    for r in rows:
        per = [sum(r["scores"][t].values()) / len(r["scores"][t]) for t in tasks]
        print(f"{r['config']:28} {r['mean_score']:6.3f} {r['density']:8.3f} " + " ".join(f"{p:10.2f}" for p in per))
    solved = [t for t in tasks if sum(dense["scores"][t].values()) > 0]

    def solved_score(r):
        vals = [v for t in solved for v in r["scores"][t].values()]
        return sum(vals) / len(vals) if vals else 0.0

    goals = []
    base = solved_score(dense)
    for method in ("streaming", "vertical_slash", "antidiagonal", "flexprefill"):
        sparser = [r for r in rows if r["method"] == method]
        if sparser and base > 0:
            r = sparser[-1]
            goals.append(goal(f"{r['config']}: score / dense on tasks dense solves ({', '.join(solved)})",
                              solved_score(r) / base, 0.9, better="higher"))
    summary = [{k: v for k, v in r.items() if k != "examples"} for r in rows]
    write_results(args.name, {"model": model_name, "lengths": lengths, "tasks": tasks, "examples_per_task": args.examples,
                              "solved_by_dense": solved, "rows": summary}, goals)
    print_goals(goals)


if __name__ == "__main__":
    main()
