"""Activation sparsity on a GPU: dense cuBLAS GEMV vs gather-then-GEMM vs our sparse GEMV, then a whole decode step.

    PYTHONPATH=src python benchmarks/activation_speed.py [--layers 32] [--name activation_speed]

Layers: Llama-3-8B shapes (out x in: 4096x4096, 14336x4096, 4096x14336),
bf16, one token, with 25/50/65% of the input channels cut at random
thresholds. Dense: ``F.linear`` on the uncut input. Gather (the naive way;
measured at 0.46x-0.60x of dense at 50% on an H100 by the issue's author):
cut, find the active indices, ``x[idx] @ W[:, idx]^T``. Ours:
:func:`sparsa.kernels.sparse_gemv.sparse_gemv` on W stored transposed once,
with the cut fused in (per-channel thresholds); its launch configuration is
searched per shape at 50% and reused. "As dispatched": the configuration a
layer picks for itself among fewer candidates (``sparsa.kernels.gemv_dispatch``),
timed the same way. Dense and ours are timed as a decode
engine runs them, captured in a CUDA graph (20 calls a replay, cycling over
enough copies of the weight that none is found in L2, as in a model);
gather cannot be captured (its index count needs the host) and is timed
eagerly.
Every output is checked against float64.

End to end: the Llama-3-8B-shaped stack of ``llama_stack.py`` with random
dense weights. Every linear input is cut at its calibrated median (one
dense decode step records each layer's ``|x|``; 50% sparsity), through
:class:`sparsa.activations.kernel.SparseInputLinear`. One decode step at a
4096-token context, CUDA-graph captured, dense vs ours.

Goals (issue 7): ours at least 1.6x dense at 50% sparsity (the limit is 2x);
decode tokens/s at least 1.4x dense.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsa.benchmarking import goal, print_goals, write_results
from sparsa.kernels.bench_gemv import CALLS, SHAPES, gemv_calls, gemv_row, graph_us, random_cut, random_layer

LEVELS = (0.25, 0.5, 0.65)


def configs():
    """The launch grid searched per shape: at most 256 weight elements per thread."""
    from sparsa.kernels.sparse_gemv import GemvConfig

    return [GemvConfig(bn, bk, warps) for bn in (32, 64, 128) for bk in (64, 128, 256) for warps in (1, 2, 4)
            if 8 <= bn * bk // (32 * warps) <= 256]


def search(x, wts, thr, ref):
    """The fastest correct launch configuration for these weights (graph-timed)."""
    from sparsa.kernels.sparse_gemv import sparse_gemv

    timed = []
    for c in configs():
        try:
            out = sparse_gemv(x, wts[0], threshold=thr, config=c)
            if ((out.double() - ref).norm() / ref.norm()).item() > 1e-2:
                continue
            timed.append((graph_us(gemv_calls(x, wts, thr, c)), c))
        except Exception:  # noqa: BLE001 - a configuration that does not compile here is skipped
            continue
    return min(timed, key=lambda t: t[0])[1]


def tune(n: int, k: int):
    """Search a configuration for an ``(n, k)`` layer at 50% on random weights (for the end-to-end shapes)."""
    x, ws, wts, g = random_layer(n, k, n * k)
    thr, _, ref = random_cut(x, ws[0], 0.5, g)
    return search(x, wts, thr, ref)


def layer_rows() -> tuple[list[dict], dict]:
    from triton.testing import do_bench

    rows, tuned = [], {}
    for label, n, k in SHAPES["8B"]:
        x, ws, wts, g = random_layer(n, k, n + k)
        best = None
        for level in (0.5, *[lv for lv in LEVELS if lv != 0.5]):
            thr, keep, ref = random_cut(x, ws[0], level, g)

            def gather():
                xc = x * keep
                idx = xc[0].nonzero().flatten()
                return F.linear(xc[:, idx], ws[0][:, idx])

            gather_us = 1000.0 * do_bench(gather, warmup=5, rep=30, return_mode="median")

            if best is None:  # search the launch configuration once per shape, at 50%
                best = tuned[(n, k)] = search(x, wts, thr, ref)
            row = {"layer": label, "n": n, "k": k, "sparsity": level, "active": int(keep.sum()),
                   **gemv_row(x, ws, wts, thr, ref, best), "gather_us": gather_us}
            row["gather_speedup"] = row["dense_us"] / gather_us
            picked = gemv_row(x, ws, wts, thr, ref)  # what a layer runs: the configuration it measures for itself
            row.update(dispatched_config=picked["config"], dispatched_us=picked["ours_us"], dispatched_speedup=picked["ours_speedup"])
            rows.append(row)
            print(f"{label:8} {n:>5}x{k:<5} {int(level * 100):>3}%: dense {row['dense_us']:6.1f} us, gather {gather_us:6.1f} us "
                  f"({row['gather_speedup']:.2f}x), ours {row['ours_us']:6.1f} us ({row['ours_speedup']:.2f}x) "
                  f"err {row['error']:.1e} {best.key()}; as dispatched {row['dispatched_speedup']:.2f}x {row['dispatched_config']}",
                  flush=True)
        del ws, wts
        torch.cuda.empty_cache()
    return rows, tuned


def end_to_end(layers: int, context: int, tuned: dict) -> dict:
    from llama_stack import HIDDEN, Stack, rel_error, time_decode

    from sparsa.activations.kernel import SparseInputLinear

    def linear(n, k, seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        layer = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        layer.weight.data = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * (1.0 / math.sqrt(k))
        return layer

    with torch.no_grad():
        model = Stack(layers, context + 1, linear).eval()
        dense_ms, dense_out = time_decode(model, context, reps=100)
        # calibrate: each linear's median |x| over one dense decode step
        medians, hooks = {}, []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                hooks.append(module.register_forward_pre_hook(
                    lambda m, args, name=name: medians.__setitem__(name, float(args[0].abs().float().median()))))
        token = torch.randn(1, 1, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(7))
        model(token, context)
        for h in hooks:
            h.remove()
        for shape in {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, nn.Linear)} - set(tuned):
            tuned[shape] = tune(*shape)
            print(f"tuned {shape}: {tuned[shape].key()}", flush=True)
        for name, threshold in medians.items():
            old = model.get_submodule(name)
            model.set_submodule(name, SparseInputLinear(old, torch.full((old.in_features,), threshold, device="cuda"),
                                                            tuned.get((old.out_features, old.in_features))))
            del old
        torch.cuda.empty_cache()
        ours_ms, ours_out = time_decode(model, context, reps=100)
    return {"layers": layers, "context": context, "decode_dense_ms": dense_ms, "decode_ours_ms": ours_ms,
            "decode_dense_tok_s": 1000.0 / dense_ms, "decode_ours_tok_s": 1000.0 / ours_ms,
            "decode_speedup": dense_ms / ours_ms, "relative_change_of_output": rel_error(ours_out, dense_out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the end-to-end stack (Llama-3-8B: 32)")
    parser.add_argument("--context", type=int, default=4096, help="KV-cache length of the decode step")
    parser.add_argument("--name", default="activation_speed")
    parser.add_argument("--glue", choices=("compiled", "eager"), default="compiled",
                        help="the end-to-end stack's operations between the linears: torch.compile'd or eager")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("activation_speed.py needs a CUDA GPU")
    rows, tuned = layer_rows()
    at50 = [r["ours_speedup"] for r in rows if r["sparsity"] == 0.5]
    goals = [goal("geomean ours/dense at 50% (8B shapes)", math.exp(sum(map(math.log, at50)) / len(at50)), 1.6, better="higher"),
             goal("worst relative error vs float64", max(r["error"] for r in rows), 1e-2)]
    if args.glue == "compiled":
        from llama_stack import compile_glue

        compile_glue()
    e2e = dict(end_to_end(args.layers, args.context, tuned), glue=args.glue)
    print(f"decode step, {args.layers} layers, context {args.context}, 50% of every linear input cut: dense "
          f"{e2e['decode_dense_tok_s']:.1f} tok/s, ours {e2e['decode_ours_tok_s']:.1f} tok/s ({e2e['decode_speedup']:.2f}x); "
          f"output moved by {e2e['relative_change_of_output']:.2f} (relative) by the cut")
    goals.append(goal("decode tokens/s ours/dense, 50% activation sparsity", e2e["decode_speedup"], 1.4, better="higher"))
    write_results(args.name, {"rows": rows, "end_to_end": e2e, "calls_per_graph": CALLS}, goals)
    print_goals(goals)


if __name__ == "__main__":
    main()
