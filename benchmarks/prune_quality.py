"""Perplexity of every pruning method on the default model, side by side with llm-compressor.

    python benchmarks/prune_quality.py [--peer-python .venv-llmc/bin/python] [--resume]

SmolLM2-135M-Instruct (float32, CPU), calibrated on the shipped calibration
text, evaluated on the shipped evaluation text; dense, then every method at
50% unstructured, 2:4 and 70% unstructured (plus Wanda and DSnoT with OWL
budgets at 70%). With ``--peer-python`` (a Python that has ``llmcompressor``,
in its own virtual environment because of its pins:
``python3 -m venv .venv-llmc && .venv-llmc/bin/pip install torch==2.13.0 llmcompressor``)
llm-compressor's Wanda and SparseGPT run on the same model, the same
calibration token ids and the same evaluation windows, in the same run.

Each finished configuration is appended to benchmarks/results/prune_quality.partial.jsonl;
``--resume`` skips those already there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import sparsa
from sparsa.benchmarking import Journal, goal, print_goals, write_results
from sparsa.data import calibration_samples, shipped_text
from sparsa.models.loading import _gguf_cache, default_model_path

SAMPLES, SEQ_LEN, EVAL_TOKENS, EVAL_SEQ = 32, 512, 20480, 1024
OURS = [
    (method, pattern, sparsity, owl)
    for pattern, sparsity in [("unstructured", 0.5), ("2:4", 0.5), ("unstructured", 0.7)]
    for method in ("magnitude", "wanda", "sparsegpt", "dsnot")
    for owl in (False,)
] + [("wanda", "unstructured", 0.7, True), ("dsnot", "unstructured", 0.7, True)]
PEER = [(method, pattern) for method in ("wanda", "sparsegpt") for pattern in ("unstructured", "2:4")]


def label(method: str, pattern: str, sparsity: float, owl: bool = False) -> str:
    return f"{method}{'+owl' if owl else ''} {pattern if pattern != 'unstructured' else f'{sparsity:.0%}'}"


def ours(name: str, method: str, pattern: str, sparsity: float, owl: bool) -> dict:
    lm = sparsa.load_model()
    start = time.perf_counter()
    record = sparsa.prune(lm, method=method, pattern=pattern, sparsity=sparsity, owl=owl, n_samples=SAMPLES, seq_len=SEQ_LEN, progress=False) if method != "dense" else {}
    seconds = time.perf_counter() - start
    result = sparsa.evaluate(lm, seq_len=EVAL_SEQ, max_tokens=EVAL_TOKENS, progress=False)
    return {
        "name": name, "library": "sparsa", "method": method, "pattern": pattern, "sparsity": sparsity, "owl": owl,
        "perplexity": result.perplexity, "tokens": result.tokens, "prune_seconds": seconds if record else 0.0,
        "linear_sparsity": sparsa.inspect(lm).linear_sparsity,
    }


def peer(python: str, method: str, pattern: str, model_dir: Path, calib_file: Path) -> dict:
    script = Path(__file__).parent / "peers" / "llmcompressor_prune.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run(
        [python, str(script), "--model", str(model_dir), "--calibration", str(calib_file), "--method", method,
         "--pattern", pattern, "--eval-tokens", str(EVAL_TOKENS), "--eval-seq-len", str(EVAL_SEQ)],
        capture_output=True, text=True, env=env,
    )
    if out.returncode:
        raise RuntimeError(f"llm-compressor run failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", default=None, help="a Python with llmcompressor installed")
    parser.add_argument("--resume", action="store_true", help="skip configurations already in the partial results")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    journal = Journal("prune_quality", key=lambda row: row["name"], fresh=not args.resume)
    model_dir = _gguf_cache(default_model_path())
    tokenizer = sparsa.load_model().tokenizer
    jobs = [("dense", "dense", "unstructured", 0.0, False)] + [(label(*c), *c) for c in OURS]
    for name, method, pattern, sparsity, owl in jobs:
        if name in journal:
            continue
        print(f"... {name}", file=sys.stderr, flush=True)
        journal.append(ours(name, method, pattern, sparsity, owl))
    if args.peer_python:
        with tempfile.TemporaryDirectory() as tmp:
            calib_file = Path(tmp) / "calibration.safetensors"
            ids = calibration_samples(tokenizer, shipped_text("calibration"), SAMPLES, SEQ_LEN, seed=0)
            save_file({"input_ids": ids.contiguous()}, calib_file)
            for method, pattern in PEER:
                name = f"llm-compressor {label(method, pattern, 0.5)}"
                if name in journal:
                    continue
                print(f"... {name}", file=sys.stderr, flush=True)
                try:
                    row = peer(args.peer_python, method, pattern, model_dir, calib_file)
                except RuntimeError as e:
                    row = {"method": method, "pattern": pattern, "error": str(e)}
                journal.append({"name": name, "library": "llm-compressor", "sparsity": 0.5, **row})
    rows = list(journal.done.values())
    report(rows)


def report(rows: list[dict]) -> None:
    by_name = {r["name"]: r for r in rows}
    dense = by_name["dense"]["perplexity"]
    print(f"\n{'configuration':<32}{'perplexity':>12}{'vs dense':>10}{'prune s':>10}")
    for r in rows:
        if "perplexity" in r:
            print(f"{r['name']:<32}{r['perplexity']:>12.3f}{r['perplexity'] / dense:>9.2f}x{r.get('prune_seconds', 0):>10.1f}")
        else:
            print(f"{r['name']:<32}  failed: {r.get('error')}")
    goals = []
    ppl = lambda n: by_name[n]["perplexity"]  # noqa: E731
    for pattern in ("50%", "2:4"):
        goals.append(goal(f"wanda {pattern}: magnitude/wanda perplexity ratio", ppl(f"magnitude {pattern}") / ppl(f"wanda {pattern}"), 1.0, "higher"))
        goals.append(goal(f"sparsegpt {pattern}: magnitude/sparsegpt perplexity ratio", ppl(f"magnitude {pattern}") / ppl(f"sparsegpt {pattern}"), 1.0, "higher"))
    goals.append(goal("70%: wanda/dsnot perplexity ratio (DSnoT ahead of Wanda)", ppl("wanda 70%") / ppl("dsnot 70%"), 1.0, "higher"))
    for method in ("wanda", "sparsegpt"):
        for pattern in ("50%", "2:4"):
            peer_row = by_name.get(f"llm-compressor {method} {pattern}")
            if peer_row and "perplexity" in peer_row:
                ours_row = by_name[f"{method} {pattern}"]
                goals.append(goal(f"{method} {pattern}: our perplexity / llm-compressor's", ours_row["perplexity"] / peer_row["perplexity"], 1.01, "lower"))
                goals.append(goal(f"{method} {pattern}: our prune time / llm-compressor's", ours_row["prune_seconds"] / peer_row["prune_seconds"], 1.0, "lower"))
    print_goals(goals)
    path = write_results("prune_quality", {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
        "calibration": {"text": "shipped calibration (Python docs prose)", "samples": SAMPLES, "seq_len": SEQ_LEN},
        "evaluation": {"text": "shipped evaluation (Jargon File)", "tokens": EVAL_TOKENS, "seq_len": EVAL_SEQ},
        "rows": rows,
    }, goals)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
