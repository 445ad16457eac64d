"""The default frontier sweep on the embedded SmolLM2-135M: on a CPU, speed predicted from stored GPU measurements; on a GPU, measured.

    PYTHONPATH=src python benchmarks/frontier_default.py [--resume] [--name frontier_default] [--device cuda] [--only TEXT]

Runs ``sparsa frontier`` with the shipped default sweep (weights, attention,
activations and two combinations; perplexity on 8,192 tokens of the shipped
evaluation text, needle and multi-value at 2,048 tokens) and writes
``benchmarks/results/NAME/{results.jsonl,frontier.png,report.html}`` and
``benchmarks/results/NAME.json`` (every record, the Pareto rows, goals).
Without a GPU the speedups are predicted by ``sparsa.frontier.costmodel``
from ``benchmarks/results/*.json``; with ``--device cuda`` the model runs in
bfloat16 on the GPU and every configuration is timed on its kernels.
``--only TEXT`` keeps dense and the configurations whose id contains TEXT
(to measure again what a change touched, beside dense, in a separate file).

Goals (issue 8): the whole sweep finishes in under 30 minutes on this CPU,
and every configuration finishes without an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from sparsa.benchmarking import RESULTS, goal, print_goals, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="frontier_default")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run (the time goal then counts the recorded seconds)")
    parser.add_argument("--device", default="cpu", help="cpu (speed predicted) or cuda (speed measured)")
    parser.add_argument("--only", default=None, help="keep dense and the configurations whose id contains this")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    from sparsa.frontier import frontier, load_sweep

    where = "CPU" if args.device == "cpu" else "GPU"
    out = RESULTS / args.name
    sweep = load_sweep()
    if args.only:
        kept = tuple(c for c in sweep.configs if c.is_dense or args.only in c.id)
        sweep = dataclasses.replace(sweep, configs=kept)
    start = time.perf_counter()
    result = frontier(None, sweep, out=out, fresh=not args.resume, device=args.device)
    wall = time.perf_counter() - start
    seconds = wall if not args.resume else sum(r.get("seconds", 0.0) for r in result.records)
    failed = [r["id"] for r in result.records if r.get("status") != "ok"]
    goals = [
        goal(f"default sweep on {where}, minutes", round(seconds / 60, 2), 30.0),
        goal("configurations failed", float(len(failed)), 0.0),
    ]
    print_goals(goals)
    pareto = [dataclasses.asdict(r) for r in result.pareto]
    path = write_results(args.name, {
        "model": f"SmolLM2-135M-Instruct (embedded default, {'float32, CPU' if where == 'CPU' else 'bfloat16, ' + args.device})",
        "sweep": "src/sparsa/frontier/default_sweep.toml" + (f", configurations with {args.only!r} in their id and dense" if args.only else ""),
        "settings": sweep.settings.to_dict(),
        "configurations": len(sweep.configs),
        "wall_seconds": wall,
        "fresh": not args.resume,
        "failed": failed,
        "pareto": pareto,
        "files": [f"{args.name}/results.jsonl", f"{args.name}/frontier.png", f"{args.name}/report.html"],
        "records": result.records,
    }, goals)
    print(f"wrote {path} and {out}/", file=sys.stderr)


if __name__ == "__main__":
    main()
