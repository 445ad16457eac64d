"""llm-compressor's Wanda or SparseGPT on a model, timed, then evaluated with sparsa's perplexity.

Run by benchmarks/prune_quality.py under a Python that has llmcompressor
(its pins differ from ours, so it lives in its own virtual environment).
Prints one JSON line: perplexity, tokens, prune_seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparsa.data import shipped_text
from sparsa.eval.perplexity import perplexity


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", required=True, help="safetensors file with input_ids [N, L]")
    p.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--eval-tokens", type=int, default=20480)
    p.add_argument("--eval-seq-len", type=int, default=1024)
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    ids = load_file(args.calibration)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    structure = "0:0" if args.pattern == "unstructured" else args.pattern
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[args.method]
    recipe = modifier(sparsity=0.5, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
    seconds = time.perf_counter() - start
    model.eval()
    result = perplexity(model, tokenizer, shipped_text("evaluation"), seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, progress=False)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    print(json.dumps({"method": args.method, "pattern": args.pattern, "perplexity": result.perplexity, "tokens": result.tokens, "prune_seconds": seconds, "linear_sparsity": zeros}))


if __name__ == "__main__":
    main()
