"""Recovery of a 2:4 model by masked fine-tuning with distillation from the dense teacher.

    python benchmarks/recovery.py [--steps 60] [--lr 1e-4] [--seq-len 256] [--batch-size 4]
    torchrun --nproc_per_node 2 benchmarks/recovery.py --device cuda --steps 200 --name recovery_gpu2   # FSDP2
    torchrun --nproc_per_node 1 benchmarks/recovery.py --device cuda --steps 200 --name recovery_gpu1   # same curve?

SmolLM2-135M-Instruct: perplexity of the dense model and of Wanda 2:4
(calibrated on 32 x 512 tokens of the shipped calibration text) on the first
``--eval-tokens`` tokens of the shipped evaluation text; then ``--steps`` steps
of ``distill`` (masked fine-tuning, per-layer L2 on normalised hidden states
plus KL on logits from the dense model) on the shipped calibration text,
and the perplexity again. The goal: recover at least half of the perplexity
gap between Wanda 2:4 and dense, with the 2:4 mask unchanged. The loss curve
of every step is in the results, so runs on one and two GPUs can be compared.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

import sparsa
from sparsa.benchmarking import goal, print_goals, write_results
from sparsa.prune.patterns import check_nm
from sparsa.train import MaskState, TrainConfig, train_model

EVAL_SEQ = 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory or id (default: the embedded SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step over all processes")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--method", default="distill", choices=["distill", "masked"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--name", default="recovery", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(0)

    lm = sparsa.load_model(args.model, device=device, dtype=args.dtype)
    eval_kw = dict(seq_len=EVAL_SEQ, max_tokens=args.eval_tokens, progress=False)
    dense = sparsa.evaluate(lm, **eval_kw)
    say(f"dense: perplexity {dense.perplexity:.3f} on {dense.tokens} tokens")
    teacher = copy.deepcopy(lm.model)
    started = time.perf_counter()
    sparsa.prune(lm, method="wanda", pattern="2:4", n_samples=32, seq_len=512, progress=False)
    prune_seconds = time.perf_counter() - started
    pruned = sparsa.evaluate(lm, **eval_kw)
    say(f"wanda 2:4: perplexity {pruned.perplexity:.3f} (pruned in {prune_seconds:.1f} s)")

    masks = MaskState.from_model(lm.model)
    before = masks.clone()
    config = TrainConfig(method=args.method, steps=args.steps, lr=args.lr, seq_len=args.seq_len, batch_size=args.batch_size, warmup=args.warmup, checkpoint_every=10)
    record = train_model(lm, config, teacher=teacher, masks=masks, checkpoint_dir=args.checkpoint_dir, resume=args.resume, progress=rank == 0)
    say(f"{args.method}: {record['steps']} steps, {record['tokens']} tokens, {record['seconds']:.1f} s ({record['seconds'] / args.steps:.2f} s/step)")
    recovered = sparsa.evaluate(lm, **eval_kw)
    weights_follow = MaskState.from_model(lm.model, names=before.names())
    mask_kept = before.equal(masks) and all(check_nm(m, 2, 4) for m in weights_follow.masks.values())
    mask_kept = mask_kept and all(bool((~before.masks[n] <= ~m).all()) for n, m in weights_follow.masks.items())
    gap = pruned.perplexity - dense.perplexity
    fraction = (pruned.perplexity - recovered.perplexity) / gap
    say(f"recovered: perplexity {recovered.perplexity:.3f}; {fraction:.1%} of the gap to dense closed; mask kept: {mask_kept}")

    if rank != 0:
        return
    goals = [
        goal("fraction of the Wanda 2:4 perplexity gap recovered", fraction, 0.5, "higher"),
        goal("2:4 mask unchanged by training (1 = yes)", float(mask_kept), 1.0, "higher"),
    ]
    curve = record.pop("loss_curve")
    payload = {
        "model": lm.info.name,
        "dtype": args.dtype,
        "processes": world,
        "evaluation": {"text": "evaluation (shipped)", "tokens": dense.tokens, "seq_len": EVAL_SEQ},
        "perplexity": {"dense": dense.perplexity, "wanda_2_4": pruned.perplexity, "recovered": recovered.perplexity},
        "gap_recovered": fraction,
        "pruning": {"method": "wanda", "pattern": "2:4", "calibration": "32 x 512 tokens of the shipped calibration text", "seconds": round(prune_seconds, 2)},
        "training": {
            "method": args.method, "data": "calibration (shipped)", "steps": record["steps"], "tokens": record["tokens"],
            "seconds": record["seconds"], "seconds_per_step": round(record["seconds"] / args.steps, 3),
            "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "optimizer": "AdamW (0.9, 0.95), cosine schedule",
            "mask_sparsity": record["mask_sparsity"], "mask_unchanged": mask_kept,
        },
        "loss_curve": curve,
    }
    path = write_results(args.name, payload, goals)
    print_goals(goals)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
