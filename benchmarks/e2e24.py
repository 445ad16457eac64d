"""End to end: a Llama-3-8B-shaped decoder stack with random 2:4 weights, dense vs sparsa's 2:4 layers.

    PYTHONPATH=src python benchmarks/e2e24.py [--layers 32] [--prefill 4096] [--context 4096] [--name e2e24]

The stack is ``llama_stack.Stack`` (gpt-fast style, bf16, hidden 4096, FFN
14336, 32/8 heads of 128). Every linear weight is random 2:4. The same weights run twice:

* dense: ``nn.Linear`` (cuBLAS) on the 2:4 weights stored dense;
* ours: the same model after ``sparsa.accelerate`` (``SparseLinear24``:
  Triton for decode, cuSPARSELt for prefill, dense where it measures faster).

Prefill: one forward of ``--prefill`` tokens (batch 1), timed with CUDA
events (median of several). Decode: one token attending to a KV cache of
``--context`` tokens, the whole step (all layers) captured in a CUDA graph,
replays timed; tokens/s = 1 / step time. Decode is also timed without the
graph (``decode_eager``: wall time of consecutive steps, launch costs
included, as Hugging Face ``generate`` runs). The operations between the linears
(norms, rotary, attention, SwiGLU) are ``torch.compile``'d for both models
(``--glue eager`` to leave them eager). Both models' dispatch is measured
before timing (reported as tune_s). Correctness: the first block's prefill
output, dense bf16 and ours, against the same block in float64 (ours may be
at most 1.5x as far off as dense); the whole stack's outputs are compared
for information only, since 32 random layers amplify rounding differences.

Goals (issue 5): prefill dense/ours >= 1.3, decode tokens/s ours/dense >= 1.25;
and, since a sparse layer must never be slower than dense, eager decode
ours/dense >= 0.97.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from llama_stack import HIDDEN, Stack, block_prefill, compile_glue, rel_error, time_decode, time_decode_eager

from sparsa.benchmarking import cuda_median_ms, goal, print_goals, write_results

def time_prefill(model, x, reps: int) -> float:
    return cuda_median_ms(lambda: model(x, 0), reps=reps, warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-3-8B: 32)")
    parser.add_argument("--prefill", type=int, default=4096, help="prefill tokens")
    parser.add_argument("--context", type=int, default=4096, help="KV-cache length seen by each decode step")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (median)")
    parser.add_argument("--name", default="e2e24", help="results file name")
    parser.add_argument("--glue", choices=("compiled", "eager"), default="compiled",
                        help="the operations between the linears: torch.compile'd (as serving engines run them) or eager")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("e2e24.py needs a CUDA GPU")
    import sparsa

    torch.manual_seed(0)
    if args.glue == "compiled":
        compile_glue()
    t0 = time.perf_counter()
    from sparsa.kernels.sparse24 import random_24_linear

    model = Stack(args.layers, max(args.prefill, args.context) + 1,
                  lambda n, k, seed: random_24_linear(n, k, torch.bfloat16, seed=seed)).eval()
    build_s = time.perf_counter() - t0
    x = torch.randn(1, args.prefill, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(3))
    result = {"glue": args.glue, "layers": args.layers, "prefill_tokens": args.prefill, "decode_context": args.context, "build_s": round(build_s, 1)}
    with torch.no_grad():
        y_dense = model(x, 0)[:, -64:].clone()
        result["prefill_dense_ms"] = time_prefill(model, x, args.reps)
        result["decode_dense_ms"], d_dense = time_decode(model, args.context, args.reps * 5)
        result["decode_eager_dense_ms"] = time_decode_eager(model, args.context, args.reps * 5)

        # correctness: the first block against float64, dense bf16 and ours side by side (32 random
        # layers amplify rounding, so the whole stack is compared only for information)
        block64 = copy.deepcopy(model.blocks[0]).double()
        ref64 = block_prefill(block64, x.double())
        del block64
        block_dense = rel_error(block_prefill(model.blocks[0], x), ref64)

        t0 = time.perf_counter()
        report = sparsa.accelerate(model)
        result["accelerate"] = {k: v for k, v in report.items() if isinstance(v, (int, float, str))}
        model(x, 0)  # measures each layer shape's prefill dispatch once
        result["tune_s"] = round(time.perf_counter() - t0, 1)
        y_ours = model(x, 0)[:, -64:].clone()
        result["prefill_error"] = rel_error(y_ours, y_dense)
        result["block0_error_vs_float64"] = {"dense": block_dense, "ours": rel_error(block_prefill(model.blocks[0], x), ref64)}
        del ref64
        result["prefill_ours_ms"] = time_prefill(model, x, args.reps)
        result["decode_ours_ms"], d_ours = time_decode(model, args.context, args.reps * 5)
        result["decode_eager_ours_ms"] = time_decode_eager(model, args.context, args.reps * 5)
        result["decode_error"] = rel_error(d_ours, d_dense)
        result["paths"] = sorted({f"{name.split('.')[-1]}: " + ",".join(f"m{m}->{r[0]}" for (m, _), r in sorted(mod._routes.items()))
                                  for name, mod in model.named_modules() if isinstance(mod, sparsa.kernels.SparseLinear24)})
    prefill = result["prefill_dense_ms"] / result["prefill_ours_ms"]
    decode = result["decode_dense_ms"] / result["decode_ours_ms"]
    eager = result["decode_eager_dense_ms"] / result["decode_eager_ours_ms"]
    result.update(prefill_speedup=prefill, decode_speedup=decode, decode_eager_speedup=eager,
                  decode_dense_tok_s=1000.0 / result["decode_dense_ms"], decode_ours_tok_s=1000.0 / result["decode_ours_ms"])
    b0 = result["block0_error_vs_float64"]
    goals = [
        goal("prefill dense/ours (4k tokens)", prefill, 1.3, better="higher"),
        goal("decode tokens/s ours/dense", decode, 1.25, better="higher"),
        goal("decode tokens/s without CUDA graphs (eager), ours/dense", eager, 0.97, better="higher"),
        goal("first block: error vs float64, ours / dense bf16", b0["ours"] / b0["dense"], 1.5),
    ]
    print(f"{torch.cuda.get_device_name()}: Llama-3-8B-shaped stack, {args.layers} layers, bf16, random 2:4 weights")
    print(f"{'':10} {'dense':>12} {'ours':>12} {'ratio':>8}")
    print(f"{'prefill':10} {result['prefill_dense_ms']:10.2f}ms {result['prefill_ours_ms']:10.2f}ms {prefill:7.2f}x   ({args.prefill} tokens)")
    print(f"{'decode':10} {result['decode_dense_tok_s']:8.1f}tok/s {result['decode_ours_tok_s']:8.1f}tok/s {decode:7.2f}x   (context {args.context})")
    print(f"{'eager dec.':10} {1000 / result['decode_eager_dense_ms']:8.1f}tok/s {1000 / result['decode_eager_ours_ms']:8.1f}tok/s "
          f"{eager:7.2f}x   (no CUDA graph: launch costs included)")
    print(f"first block vs float64: dense {b0['dense']:.2e}, ours {b0['ours']:.2e}; whole stack, ours vs dense: "
          f"prefill {result['prefill_error']:.2e}, decode {result['decode_error']:.2e}; paths: {result['paths']}")
    path = write_results(args.name, result, goals)
    print(f"results: {path}")
    print_goals(goals)


if __name__ == "__main__":
    main()
