"""Time loading the default model plus a 20k-token perplexity evaluation, on this CPU.

Goal (issue 3): under 60 s on a 2-core machine. Two loads are timed: the first
in a fresh cache (GGUF dequantized and cached) and the usual warm one.

    python benchmarks/load_eval_cpu.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

import sparsa
from sparsa.benchmarking import goal, print_goals, write_results

TOKENS = 20480


def timed_load() -> tuple[float, object]:
    start = time.perf_counter()
    lm = sparsa.load_model()
    return time.perf_counter() - start, lm


def main() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SPARSA_CACHE"] = cache
        cold_load, _ = timed_load()
        warm_load, lm = timed_load()
    start = time.perf_counter()
    result = sparsa.evaluate(lm, max_tokens=TOKENS, seq_len=1024, progress=False)
    evaluation = time.perf_counter() - start
    total = warm_load + evaluation
    print(f"{'step':<28}{'seconds':>10}")
    for label, value in [("load, fresh cache (GGUF)", cold_load), ("load, cached", warm_load), (f"perplexity, {result.tokens} tokens", evaluation), ("load (cached) + eval", total), ("load (fresh) + eval", cold_load + evaluation)]:
        print(f"{label:<28}{value:>10.2f}")
    print(f"perplexity {result.perplexity:.3f} over {result.tokens} tokens")
    goals = [
        goal("load (cached) + 20k-token eval, s", round(total, 2), 60.0),
        goal("load (fresh cache) + 20k-token eval, s", round(cold_load + evaluation, 2), 60.0),
    ]
    print_goals(goals)
    path = write_results("load_eval_cpu", {
        "model": lm.info.summary(),
        "seconds": {"load_fresh_cache": cold_load, "load_cached": warm_load, "evaluation": evaluation},
        "perplexity": result.to_dict(),
        "tokens_per_second": result.tokens / evaluation,
    }, goals)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
