"""Sparse attention on a real model's decode steps (streaming or quest), eager and from a CUDA graph, against dense.

    PYTHONPATH=src python benchmarks/attention_decode.py [--pattern streaming|quest] [--model PATH]
        [--contexts 2048,8000] [--name attention_decode]

The model (default: the embedded SmolLM2-135M-Instruct) runs in bfloat16 on
the GPU, dense and with sparse attention in blocks of 64 tokens (``min_len``
1024): streaming (``--sink`` sink blocks and ``--local`` local blocks) or
quest (``--pages`` pages chosen per query head, besides its own). At each
context length :func:`sparsa.frontier.timing.measure` times both, as the
frontier does: a prefill of the context, greedy decode steps after it
eagerly (a dynamic cache: a streaming step attends two slices of it, a
quest step bounds every page from the keys) and replayed from a CUDA graph
(a static cache: the step chooses its slots on the device; quest keeps its
page bounds from step to step), in alternating rounds, each speedup the
median of the per-round ratios.

Before timing, the graph's tokens are checked against eager decoding's for
the sparse model: the two ways of choosing the slots should pick the same
tokens (quest's eager and graph steps run different bf16 kernels, so a near
tie may break differently).

Goals: the graph and eager decodings pick the same tokens at every context;
at the longest context, the sparse graph decode is not slower than dense's
(sparsa's rule: never slower than dense).
"""

from __future__ import annotations

import argparse
import copy

import torch

from sparsa.benchmarking import goal, print_goals, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a Hugging Face directory, .gguf or hub id (default: the embedded model)")
    parser.add_argument("--contexts", default="2048,8000", help="decode context lengths, comma-separated")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per round")
    parser.add_argument("--sink", type=int, default=1)
    parser.add_argument("--local", type=int, default=8)
    parser.add_argument("--pattern", choices=("streaming", "quest"), default="streaming")
    parser.add_argument("--pages", type=int, default=16, help="quest: pages per query head besides its own")
    parser.add_argument("--name", default="attention_decode")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_decode.py times decoding on a CUDA GPU; none is available here")

    from sparsa.attention import apply
    from sparsa.frontier.config import Settings
    from sparsa.frontier.timing import MEASURE_ROUNDS, GraphDecoder, eager_decode, measure
    from sparsa.models import load_model

    lm = load_model(args.model, device="cuda", dtype="bfloat16")
    dense = lm.model.eval()
    settings_of = {"streaming": dict(sink_blocks=args.sink, local_blocks=args.local), "quest": dict(pages=args.pages)}
    pattern = {"method": args.pattern, **settings_of[args.pattern], "block_size": 64, "min_len": 1024}
    sparse = apply(copy.deepcopy(dense), args.pattern, min_len=1024, **settings_of[args.pattern])
    rows = []
    print(f"{'context':>8} {'prefill':>8} {'eager decode':>13} {'graph decode':>13} {'graph tok/s dense -> ' + args.pattern:>32}  tokens")
    for context in [int(c) for c in args.contexts.split(",")]:
        settings = Settings(prefill_tokens=context, decode_context=context, decode_tokens=args.steps)
        ctx = torch.randint(0, dense.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context)).cuda()
        with torch.inference_mode():
            eager, _ = eager_decode(sparse, ctx, args.steps)
            graphed = GraphDecoder(sparse, ctx, args.steps).tokens()
        mismatches = sum(a != b for a, b in zip(eager, graphed))
        timed = measure(dense, sparse, settings)
        torch.cuda.empty_cache()
        row = {"context": context, "token_mismatches": mismatches, **timed}
        rows.append(row)
        print(f"{context:>8} {timed['prefill_speedup']:>7.2f}x {timed['decode_eager_speedup']:>12.2f}x "
              f"{timed.get('decode_graph_speedup', float('nan')):>12.2f}x "
              f"{timed.get('dense_decode_graph_tok_s', float('nan')):>15.0f} -> {timed.get('decode_graph_tok_s', float('nan')):<13.0f}"
              f"  {'same' if not mismatches else f'{mismatches} differ'}")
    longest = rows[-1]
    goals = [
        goal(f"decode tokens differing between graph and eager {args.pattern}, all contexts",
             float(sum(r["token_mismatches"] for r in rows)), 0.0),
        goal(f"{args.pattern} graph decode tokens/s over dense at {longest['context']} tokens",
             longest.get("decode_graph_speedup", float("nan")), 1.0, better="higher"),
    ]
    print_goals(goals)
    path = write_results(args.name, {
        "model": f"{lm.source} (bfloat16)", "pattern": pattern,
        "steps": args.steps, "rounds": MEASURE_ROUNDS, "rows": rows,
    }, goals)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
