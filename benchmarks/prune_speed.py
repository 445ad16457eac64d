"""SparseGPT and Wanda on a Llama-3-8B-shaped model (random weights): wall time and peak GPU memory.

    PYTHONPATH=src python benchmarks/prune_speed.py [--layers 32] [--samples 128] [--seq-len 2048]

The model lives in CPU memory (bfloat16); the pipeline moves one decoder layer
at a time to the GPU (``device="cuda"``), exactly as for a model too large for
the GPU. Goals (issue 4): SparseGPT on the whole model under 10 minutes; peak
GPU memory under 2x (one layer + its calibration activations).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from sparsa.benchmarking import goal, print_goals, write_results
from sparsa.models import LoadedModel, describe
from sparsa.prune.config import PruneConfig
from sparsa.prune.pipeline import prune_model

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
)


def random_llama(layers: int) -> torch.nn.Module:
    """A Llama-3-8B-shaped model with random bfloat16 weights in CPU memory (init skipped: filled directly)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, **LLAMA3_8B)
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device="cpu")
    # Random numbers are drawn on the GPU when there is one: on the CPU, 8B of them take minutes.
    source = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(source).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.empty(p.shape, dtype=p.dtype, device=source).normal_(0.0, 0.02, generator=generator))
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # recompute rotary buffers lost on meta
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--name", default="prune_speed", help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument("--device", default="cuda", help="compute device (cpu only for a smoke test)")
    parser.add_argument("--runs", default="sparsegpt:2:4,sparsegpt:unstructured,wanda:2:4,wanda:unstructured")
    parser.add_argument("--trace-after", type=float, default=0, help="dump every thread's stack after this many seconds (diagnosis)")
    args = parser.parse_args()
    if args.trace_after:
        import faulthandler

        faulthandler.dump_traceback_later(args.trace_after, repeat=True)
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        sys.exit("prune_speed.py needs a CUDA GPU (or --device cpu for a smoke test)")
    start = time.perf_counter()
    model = random_llama(args.layers)
    build_seconds = time.perf_counter() - start
    print(f"built a {args.layers}-layer Llama-3-8B-shaped model in {build_seconds:.0f} s", flush=True)
    info = describe(model, f"Llama-3-8B-shaped ({args.layers} layers, random)")
    lm = LoadedModel(model, None, info.name, info)
    layer = model.model.layers[0]
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    act_bytes = args.samples * args.seq_len * LLAMA3_8B["hidden_size"] * 2
    samples = torch.randint(0, LLAMA3_8B["vocab_size"], (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    pristine = {k: v.clone() for k, v in model.model.layers.state_dict().items()}
    rows = []
    for run in args.runs.split(","):
        method, pattern = run.split(":", 1)
        model.model.layers.load_state_dict(pristine)
        config = PruneConfig(method=method, pattern=pattern, sparsity=0.5, n_samples=args.samples, seq_len=args.seq_len)
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        record = prune_model(lm, config, device=args.device, samples=samples, progress=True)
        if gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if gpu else 0
        on_gpu_after = sum(p.is_cuda for p in model.model.layers.parameters())
        sparsity = sum(int((m.weight == 0).sum()) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)
        total = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)
        rows.append({"method": method, "pattern": pattern, "seconds": seconds, "seconds_per_layer": seconds / args.layers,
                     "peak_gpu_bytes": peak, "peak_over_layer_plus_activations": peak / (layer_bytes + act_bytes),
                     "layer_params_on_gpu_after": on_gpu_after, "linear_sparsity": sparsity / total, "record_seconds": record["seconds"]})
        print(f"{method:>10} {pattern:>12}: {seconds:8.1f} s ({seconds / args.layers:.2f} s/layer), peak {peak / 2**30:.2f} GiB", flush=True)
        report(args, info, rows, layer_bytes, act_bytes, build_seconds, gpu)  # after every run: a timeout keeps what finished


def report(args, info, rows, layer_bytes, act_bytes, build_seconds, gpu) -> None:
    print(f"\none layer {layer_bytes / 2**30:.2f} GiB, calibration activations {act_bytes / 2**30:.2f} GiB, model built in {build_seconds:.0f} s")
    print(f"{'method':>10} {'pattern':>12} {'seconds':>9} {'s/layer':>8} {'peak GiB':>9} {'peak/(layer+acts)':>18}")
    for r in rows:
        print(f"{r['method']:>10} {r['pattern']:>12} {r['seconds']:>9.1f} {r['seconds_per_layer']:>8.2f} {r['peak_gpu_bytes'] / 2**30:>9.2f} {r['peak_over_layer_plus_activations']:>18.2f}")
    goals = []
    for r in rows:
        if r["method"] == "sparsegpt" and args.layers == 32:
            goals.append(goal(f"sparsegpt {r['pattern']} whole 8B model, minutes", r["seconds"] / 60, 10.0))
        goals.append(goal(f"{r['method']} {r['pattern']} peak GPU / (layer + activations)", r["peak_over_layer_plus_activations"], 2.0))
    print_goals(goals)
    if not gpu:
        return  # a smoke test writes no results
    write_results(args.name, {
        "model": info.summary(), "layers": args.layers, "samples": args.samples, "seq_len": args.seq_len,
        "layer_bytes": layer_bytes, "activation_bytes": act_bytes, "build_seconds": build_seconds, "rows": rows,
    }, goals)


if __name__ == "__main__":
    main()
