"""Block-sparse prefill attention on a GPU: dense SDPA vs FlexAttention and our Triton kernel with sparsa's masks.

    PYTHONPATH=src python benchmarks/attention_speed.py [--lengths 32768,65536,131072] [--name attention_speed]

bf16, batch 1, 32 query heads, 8 key-value heads, head dim 128 (Llama-3-8B
attention). For each length:

* dense: ``F.scaled_dot_product_attention(..., is_causal=True)`` (FlashAttention);
* a fixed random block mask, 95% sparse over the whole L x L block grid as
  the issue counts it (about 10% of the causal blocks, the diagonal always
  kept): FlexAttention (compiled) and our Triton kernel at a few launch
  settings, against the ideal ``dense time x density``;
* every pattern at one setting: its mask-estimation time, the density it
  chose, and the time of the best backend on that mask.

Each output is checked against the reference backend on a slice of query
blocks. Times are CUDA-event medians. Goals (issue 6): best backend at 64k
and 95% sparsity at least 80% of the ideal speedup (ideal ~ 1 / density);
estimation at most 10% of dense attention time; 128k runs within 80 GB.
"""

from __future__ import annotations

import argparse
import sys

import torch

from sparsa.benchmarking import goal, print_goals, write_results

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 128
PATTERNS = [  # (label, pattern, settings)
    ("streaming", "streaming", dict(sink_blocks=1, local_blocks=16)),
    ("vertical_slash", "vertical_slash", dict(vertical=1024, slash=2048)),
    ("antidiagonal s8", "antidiagonal", dict(threshold=0.9, stride=8)),
    ("antidiagonal s16", "antidiagonal", dict(threshold=0.9, stride=16)),
    ("antidiagonal s8 fp8", "antidiagonal", dict(threshold=0.9, stride=8, fp8=True)),
    ("antidiagonal s16 fp8", "antidiagonal", dict(threshold=0.9, stride=16, fp8=True)),
    ("flexprefill", "flexprefill", dict(coverage=0.9)),
]
# first: the kernel's defaults (TMA where it can, programs of one key-value head launched together)
TRITON_LAUNCHES = [dict(), dict(kv_major=False), dict(num_stages=3), dict(inner=128, num_warps=8, num_stages=3),
                   dict(tma=False, num_warps=8, num_stages=3)]
SPARSITY = 0.95  # of the full L x L block grid, as the issue counts it: ~10% of the causal blocks are kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="32768,65536,131072")
    parser.add_argument("--name", default="attention_speed")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_speed.py needs a CUDA GPU")
    from sparsa.attention import make_pattern
    from sparsa.attention.bench import dense_ms as time_dense
    from sparsa.attention.bench import pattern_row, random_inputs, random_mask, time_backend

    rows, goals = [], []
    for length in [int(v) for v in args.lengths.split(",")]:
        torch.cuda.reset_peak_memory_stats()
        q, k, v = random_inputs(length, HEADS, KV_HEADS, DIM, seed=length)
        dense_ms = time_dense(q, k, v)
        row = {"length": length, "dense_ms": dense_ms, "fixed_95": {}, "patterns": {}}
        mask = random_mask(length, HEADS, BLOCK, SPARSITY, seed=1)
        row["fixed_95"]["density"] = mask.density()
        for backend, launch in [("flex", {})] + [("triton", t) for t in TRITON_LAUNCHES]:
            label = backend + "".join(f" {k.removeprefix('num_')}={v}" for k, v in launch.items())
            try:
                row["fixed_95"][f"{label}_ms"], row["fixed_95"][f"{label}_error"] = time_backend(q, k, v, mask, backend, **launch)
            except Exception as exc:  # noqa: BLE001 - recorded, the others still run
                row["fixed_95"][f"{label}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        timed = {key[:-3]: t for key, t in row["fixed_95"].items() if key.endswith("_ms")}
        triton_times = {key: t for key, t in timed.items() if key.startswith("triton")}
        best_launch = TRITON_LAUNCHES[list(triton_times).index(min(triton_times, key=triton_times.get))] if triton_times else {}
        row["fixed_95"]["triton_best_launch"] = best_launch
        if timed:
            row["fixed_95"]["flex_ms"] = timed.get("flex", float("nan"))
            row["fixed_95"]["triton_ms"] = min(triton_times.values(), default=float("nan"))
            row["fixed_95"]["best_speedup"] = dense_ms / min(timed.values())
            row["fixed_95"]["ideal_speedup"] = 1.0 / row["fixed_95"]["density"]
        for label, name, settings in PATTERNS:
            try:
                entry = {"settings": settings, **pattern_row(q, k, v, make_pattern(name, block_size=BLOCK, **settings), dense_ms)}
            except Exception as exc:  # noqa: BLE001
                entry = {"settings": settings, "error": f"{type(exc).__name__}: {exc}"[:300]}
            row["patterns"][label] = entry
            torch.cuda.empty_cache()
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        f95 = row["fixed_95"]
        print(f"L={length}: dense {dense_ms:.1f} ms; 95% mask (density {f95['density']:.3f} of causal): flex "
              f"{f95.get('flex_ms', float('nan')):.1f} ms, triton {f95.get('triton_ms', float('nan')):.1f} ms "
              f"{f95.get('triton_best_launch')} (ideal {dense_ms * f95['density']:.1f}); peak {row['peak_gib']:.1f} GiB", flush=True)
        for name, e in row["patterns"].items():
            if "error" in e:
                print(f"   {name:15} FAILED {e['error']}")
            else:
                print(f"   {name:15} density {e['density']:.3f} estimate {e['estimate_ms']:.1f} ms attend {e['attend_ms']:.1f} ms "
                      f"-> {e['speedup_with_estimate']:.2f}x dense", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
        if length == 65536 and "best_speedup" in f95:
            goals.append(goal("64k, 95% sparse: best backend speedup / ideal", f95["best_speedup"] / f95["ideal_speedup"], 0.8, better="higher"))
            goals.append(goal("64k, 95% sparse: best backend speedup over SDPA", f95["best_speedup"], 7.5, better="higher"))
            for label, e in row["patterns"].items():
                if "estimate_over_dense" in e:
                    goals.append(goal(f"64k: {label} mask estimation / dense attention time", e["estimate_over_dense"], 0.10))
        if length == 131072:
            goals.append(goal("128k peak GPU memory, GiB", row["peak_gib"], 80.0))
    write_results(args.name, {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "block": BLOCK, "rows": rows}, goals)
    print_goals(goals)


if __name__ == "__main__":
    main()
