"""The ``sparsa`` command line. Thin: it parses flags, calls sparsa.api, prints tables.

Every user-fixable problem becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from .errors import InputError, SparsaError, require

EPILOG_MAIN = """\
start here (the embedded SmolLM2-135M-Instruct, offline):
  sparsa prune                                   # Wanda 50%, perplexity before/after
  sparsa prune --method sparsegpt --pattern 2:4 --out pruned
  sparsa inspect pruned --layers                 # sparsity and pattern per layer
  sparsa eval pruned --activations teal --activation-sparsity 0.4
  sparsa frontier                                # which sparsity buys the most speed for the least accuracy
  sparsa bench linear                            # 2:4 kernels against dense on this GPU

prune, eval, inspect, train and frontier take a model as their first argument:
a Hugging Face directory, a .gguf file or a hub id (default: the embedded
model). 'sparsa COMMAND --help' explains each command, with examples.
"""

EPILOG_PRUNE = """\
examples:
  sparsa prune                                   # Wanda 50% on the embedded SmolLM2-135M, before/after table
  sparsa prune --method sparsegpt --pattern 2:4 --out smol-24
  sparsa prune ./my-llama --method dsnot --sparsity 0.7 --owl --out llama-70
  sparsa prune --pattern structured --sparsity 0.3 --heads 0.25 --out smol-small
  sparsa prune --checkpoint-dir ckpt --out smol-24 --pattern 2:4   # interrupted? add --resume

methods: magnitude (no data), wanda (|W|*||x||), sparsegpt (OBS weight updates),
dsnot (refines another method's mask; --dsnot-base). --owl gives layers with
more activation outliers a smaller share of the sparsity, keeping the average.
"""

EPILOG_EVAL = """\
examples:
  sparsa eval                                    # perplexity of the default model on the shipped text
  sparsa eval smol-24 --max-tokens 0             # the whole evaluation corpus
  sparsa eval smol-24 --text notes.txt --seq-len 512
  sparsa eval smol-24 --tasks hellaswag --limit 100            # lm-evaluation-harness, when its data is available
  sparsa eval smol-24 --tasks my_task --include-path ./tasks   # your own task YAML
  sparsa eval --longctx needle,variable_tracking --lengths 2048,4096 --examples 4
  sparsa eval --activations wina --activation-sparsity 0.4           # perplexity with 40% activation sparsity
  sparsa eval --longctx needle --lengths 4096 --attention vertical_slash --attention-set vertical=512 slash=512 --attention-min-len 1024

--longctx runs our seeded long-context tasks (needle, multikey, multivalue,
variable_tracking, common_words) and scores answers by exact match.
--activations zeroes the smallest activations per token (teal: |x|; wina:
|x| times the weight column norm; wina_fisher: the same with each output row
weighted by the loss's sensitivity to it; cats: the MLP gate) at calibrated
thresholds.
--attention makes attention sparse during the evaluation (patterns: streaming,
vertical_slash, antidiagonal, flexprefill for prefill; quest for decoding).
"""

EPILOG_INSPECT = """\
examples:
  sparsa inspect smol-24            # global sparsity, detected pattern, zero parameters
  sparsa inspect smol-24 --layers   # one row per linear layer
  sparsa inspect smol-24 --json     # the same as JSON
"""

EPILOG_BENCH = """\
examples:
  sparsa bench linear                            # Llama-3-8B linear shapes, bf16, M = 1 .. 16384
  sparsa bench linear --model 70B --dtype fp16 --tokens 1,4096
  sparsa bench linear --shape 4096x14336 --json down.json
  sparsa bench attention --lengths 32768,65536   # SDPA vs FlexAttention/Triton on a 95% block mask; every pattern's estimate
  sparsa bench attention --attention vertical_slash --attention-set vertical=1024 slash=2048
  sparsa bench attention --attention antidiagonal --attention-set stride=8 fp8=true
  sparsa bench activations --activation-sparsity 0.5 --model 70B

linear: each row is dense cuBLAS, torch's stock semi-structured 2:4 path and
sparsa's SparseLinear24 (Triton for few tokens, cuSPARSELt for many, dense
where that measures faster), timed alternately on a random 2:4 weight; ratios
are dense time over each (> 1 is faster). The first run of a shape measures
the dispatch and caches it (~/.cache/sparsa).
attention: dense causal SDPA, then FlexAttention and our Triton kernel on a
random block mask, then each pattern's mask-estimation time on random inputs
(estimation is what a pattern adds; random inputs spread attention evenly, so
threshold patterns keep most blocks there, unlike real prompts).
activations: one decode token through dense cuBLAS and our sparse GEMV with a
share of input channels cut, CUDA-graph timed as a decode step runs.
All need a CUDA GPU and triton.
"""

EPILOG_TRAIN = """\
examples:
  sparsa train --prune wanda --pattern 2:4 --steps 200 --out smol-24-distilled   # prune, then distil from the dense model
  sparsa train smol-24 --method masked --steps 100 --lr 5e-5 --out smol-24-ft     # fine-tune a pruned model, mask kept
  sparsa train --method sr_ste --pattern 2:4 --steps 500 --out smol-srste         # N:M training from the dense model
  sparsa train --method rigl --sparsity 0.7 --set update_every=20 --out smol-rigl
  sparsa train smol-24 --method soup --teacher ./dense --set soup_size=3 soup_base=distill
  sparsa train smol-24 --method masked --checkpoint-dir ckpt --steps 1000   # interrupted? add --resume
  torchrun --nproc_per_node 2 -m sparsa.cli train smol-24 --device cuda --method distill --teacher ./dense

methods: masked (cross-entropy, mask kept), distill (masked + per-layer hidden
L2 + logit KL from the dense teacher), sr_ste (N:M with SR-STE), rigl and set
(mask moves, sparsity kept), imp (iterative magnitude pruning with weight
rewinding), soup (copies sharing the mask, averaged). The mask is read off the
model's zero weights; --prune makes them first and keeps the dense model as
the teacher. --set KEY=VALUE sets any other TrainConfig field (sparsa.train).
"""

class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming the fix, not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{message} (see: {self.prog} --help)")


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction such as 0.5") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1); give a fraction such as 0.5")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _tokens(text: str) -> int:
    return 0 if text == "0" else _positive(text)


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="HF model directory, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype (auto: float32 on CPU, bfloat16 on GPU)")


def _eval_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}text", default="evaluation", help="'evaluation' (shipped), a .txt/.jsonl file or hf:NAME:SPLIT (default: evaluation)")
    p.add_argument(f"--{prefix}seq-len", type=_positive, default=1024, help="tokens per non-overlapping window (default: 1024)")
    p.add_argument(f"--{prefix}max-tokens", type=_tokens, default=20480, help="evaluate at most this many tokens; 0 for all (default: 20480)")


def _attention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention", default=None, metavar="PATTERN", help="sparse attention pattern: streaming, vertical_slash, antidiagonal, flexprefill, quest")
    p.add_argument("--attention-set", nargs="*", default=[], metavar="KEY=VALUE", help="pattern settings, e.g. vertical=1024 slash=2048 (see sparsa.attention)")
    p.add_argument("--attention-min-len", type=_positive, default=None, help="keys below which attention stays dense (default: 4096)")
    p.add_argument("--attention-layers", default=None, help="comma-separated decoder layers made sparse (default: all; negative counts from the end)")


def _settings(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--attention-set {pair!r} is not KEY=VALUE; e.g. --attention-set vertical=1024")
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
            continue
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                raise InputError(f"--attention-set {pair}: the value must be a number, true or false") from None
    return out


def _int_list(text: str, flag: str, positive: bool = False) -> list[int]:
    kind = "positive integers" if positive else "integers"
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or (positive and min(values) < 1):
        raise InputError(f"{flag} {text!r}: give {kind} separated by commas, e.g. 1,16,4096")
    return values


def _only_with(args, enabler: str, enabler_flag: str, *options: tuple[str, str]) -> None:
    """Refuse options that do nothing unless ``enabler`` is given (their parser defaults, None or [], mean unset)."""
    if getattr(args, enabler):
        return
    for dest, flag in options:
        if getattr(args, dest) not in (None, []):
            raise InputError(f"{flag} has no effect without {enabler_flag}; add {enabler_flag} or drop {flag}")


def _apply_attention(lm, args) -> None:
    if not args.attention:
        return
    from .attention import apply

    layers = _int_list(args.attention_layers, "--attention-layers") if args.attention_layers else None
    apply(lm.model, args.attention, layers=layers, min_len=args.attention_min_len, **_settings(args.attention_set))
    _say(f"sparse attention: {args.attention} {' '.join(args.attention_set)} (dense below {args.attention_min_len} keys)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .prune.base import METHODS

    parser = _Parser(prog="sparsa", description="Make transformer models sparse, and measure what that buys.", epilog=EPILOG_MAIN,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sparsa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("prune", help="prune a model one-shot and compare perplexity before/after", description="Prune a causal LM one-shot, layer by layer, on calibration text; evaluate before and after; optionally save.", epilog=EPILOG_PRUNE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arg(p)
    p.add_argument("--method", default="wanda", choices=METHODS.names(), help="pruning method (default: wanda)")
    p.add_argument("--sparsity", type=_unit_interval, default=None, help="fraction of weights removed, in [0, 1) (default: 0.5; an N:M pattern implies its own, 1 - N/M)")
    p.add_argument("--pattern", default="unstructured", help="unstructured, N:M along the input dim (2:4, 4:8, 1:4 ...) or structured (default: unstructured)")
    p.add_argument("--heads", type=_unit_interval, default=0.0, help="with --pattern structured: fraction of attention KV-head groups removed (default: 0)")
    p.add_argument("--owl", action="store_true", help="outlier-weighted layerwise budgets (the average still meets --sparsity)")
    p.add_argument("--skip", nargs="*", default=["lm_head"], metavar="NAME", help="linears left dense: exact names, suffixes (down_proj) or globs (model.layers.0.*)")
    p.add_argument("--calibration", default="shipped", help="calibration text: shipped, a .txt/.jsonl file or hf:NAME:SPLIT (default: shipped)")
    p.add_argument("--samples", type=_positive, default=64, help="calibration sequences (default: 64)")
    p.add_argument("--seq-len", type=_positive, default=512, help="tokens per calibration sequence (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing calibration samples (default: 0)")
    p.add_argument("--dsnot-base", default=None, help="with --method dsnot: the method whose mask DSnoT refines (default: wanda)")
    p.add_argument("--compute-device", default=None, help="device that runs each layer while the model stays on --device (e.g. cuda with --device cpu)")
    _run_output_args(p, "write a checkpoint after each layer here", "pruned")

    p = sub.add_parser("eval", help="perplexity on text, or lm-evaluation-harness tasks", description="Evaluate a model: perplexity over non-overlapping windows of a text, or lm-evaluation-harness tasks.", epilog=EPILOG_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arg(p)
    _eval_args(p)
    p.add_argument("--tasks", default=None, help="comma-separated lm-evaluation-harness tasks instead of perplexity")
    p.add_argument("--include-path", default=None, help="a folder of lm-eval task YAML files")
    p.add_argument("--limit", type=_positive, default=None, help="at most this many examples per task")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    p.add_argument("--longctx", default=None, metavar="TASKS", help="comma-separated long-context tasks instead of perplexity (needle, multikey, multivalue, variable_tracking, common_words)")
    p.add_argument("--lengths", default=None, help="with --longctx: prompt lengths in tokens, comma-separated (default: 4096)")
    p.add_argument("--examples", type=_positive, default=None, help="with --longctx: examples per task and length (default: 4)")
    _attention_args(p)
    p.add_argument("--activations", default=None, metavar="METHOD", help="activation sparsity during the evaluation: teal, wina, wina_fisher or cats (calibrated on the shipped text)")
    p.add_argument("--activation-sparsity", type=_unit_interval, default=None, help="with --activations: fraction of activations zeroed, in [0, 1) (default: 0.5)")
    p.add_argument("--activation-allocation", choices=["uniform", "greedy"], default=None,
                   help="with --activations: every layer input at the same sparsity, or a greedy per-layer search "
                        "(TEAL's; minutes on CPU) that gives more to the inputs whose cut moves the layer least (default: uniform)")

    p = sub.add_parser("inspect", help="sparsity per layer, detected pattern, zero parameters", description="Report a model's architecture, parameter count, global and per-layer sparsity and the sparsity pattern each layer follows.", epilog=EPILOG_INSPECT, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arg(p)
    p.add_argument("--layers", action="store_true", help="one row per linear layer")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = sub.add_parser("bench", help="measure sparse kernels against dense on this GPU", description="Measure sparse kernels against dense, side by side, on this machine's GPU.", epilog=EPILOG_BENCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["linear", "attention", "activations"],
                   help="linear: 2:4 linear layers (dense vs stock vs ours); attention: sparse prefill attention "
                        "(SDPA vs our backends, and mask estimation); activations: the activation-sparse GEMV vs dense")
    p.add_argument("--model", default="8B", choices=["8B", "70B"], help="linear, activations: Llama-3 layer shapes to use (default: 8B)")
    p.add_argument("--shape", default=None, metavar="NxK", help="linear, activations: one layer shape instead, e.g. 4096x14336 "
                   "(out x in); activations takes a comma-separated list, e.g. 576x576,192x576 (SmolLM2-135M's q and k)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="linear: weight and input dtype (default: bf16)")
    p.add_argument("--tokens", default="1,16,64,128,1024,4096,16384", help="linear: comma-separated token counts M (default: 1,16,64,128,1024,4096,16384)")
    p.add_argument("--rep-ms", type=_positive, default=30, help="linear: timing per measurement in ms (default: 30)")
    p.add_argument("--activation-sparsity", default="0.25,0.5,0.65", help="activations: comma-separated fractions of input channels cut (default: 0.25,0.5,0.65)")
    p.add_argument("--lengths", default="16384,32768", help="attention: comma-separated prompt lengths (default: 16384,32768)")
    p.add_argument("--attention", default=None, metavar="PATTERN", help="attention: one pattern (default: every prefill pattern at its defaults)")
    p.add_argument("--attention-set", nargs="*", default=[], metavar="KEY=VALUE", help="attention: that pattern's settings, e.g. vertical=1024 slash=2048")
    p.add_argument("--heads", type=_positive, default=32, help="attention: query heads (default: 32, Llama-3-8B)")
    p.add_argument("--kv-heads", type=_positive, default=8, help="attention: key-value heads (default: 8)")
    p.add_argument("--head-dim", type=_positive, default=128, help="attention: head dimension (default: 128)")
    p.add_argument("--mask-sparsity", type=_unit_interval, default=0.95, help="attention: sparsity of the random block mask the backends are timed on, over the whole L x L grid (default: 0.95)")
    p.add_argument("--json", dest="json_out", default=None, help="also write every case to this JSON file")
    _add_train_parser(sub)
    _add_frontier_parser(sub)
    return parser


def _run_output_args(p, checkpoint_help: str, made: str) -> None:
    """What a long run that changes a model (prune, train) writes, and its before/after evaluation."""
    p.add_argument("--checkpoint-dir", default=None, help=checkpoint_help)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from --checkpoint-dir")
    p.add_argument("--out", default=None, help=f"save the {made} model here (HF directory + sparsa.json)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after perplexity")
    _eval_args(p, "eval-")


def _add_train_parser(sub) -> None:
    from .train import TRAIN_METHODS

    p = sub.add_parser("train", help="train a sparse model: recover after pruning, N:M, dynamic sparsity, soups", description="Train a causal LM while its sparsity holds: masked fine-tuning, distillation from the dense model, SR-STE, RigL/SET, IMP, soups.", epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arg(p)
    p.add_argument("--method", default="distill", choices=TRAIN_METHODS.names(), help="training method (default: distill)")
    p.add_argument("--data", default="calibration", help="training text: calibration (shipped), a .txt/.jsonl file or hf:NAME:SPLIT (default: calibration)")
    p.add_argument("--steps", type=_positive, default=100, help="optimizer steps (default: 100)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of AdamW, cosine-decayed (default: 1e-4)")
    p.add_argument("--seq-len", type=_positive, default=256, help="tokens per training sequence (default: 256)")
    p.add_argument("--batch-size", type=_positive, default=4, help="sequences per step, over all processes (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and of random choices (default: 0)")
    p.add_argument("--prune", default=None, metavar="METHOD", help="prune first with this method (wanda, sparsegpt, ...); the dense model becomes the teacher")
    p.add_argument("--pattern", default="2:4", help="N:M or unstructured: for --prune and sr_ste (default: 2:4)")
    p.add_argument("--sparsity", type=_unit_interval, default=None, help="for --prune (default: 0.5, or what an N:M --pattern implies), rigl, set and imp (default: 0.5)")
    p.add_argument("--teacher", default=None, help="the dense model to distil from, when not pruning in the same run")
    p.add_argument("--set", dest="settings", nargs="*", default=[], metavar="KEY=VALUE", help="other TrainConfig fields, e.g. update_every=20 rounds=4 soup_size=3")
    _run_output_args(p, "write checkpoints here (every --set checkpoint_every=N steps, and at the end)", "trained")


# -- commands ----------------------------------------------------------------------------

def _load(args):
    from .api import load_model

    _say(f"loading {args.model or 'the default model (SmolLM2-135M-Instruct)'} ...")
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    _say(lm.info.summary())
    return lm


def cmd_prune(args) -> int:
    from .api import evaluate, inspect, prune
    from .models import check_output, save_model
    from .prune.config import PruneConfig

    if args.dsnot_base and args.method != "dsnot":
        raise InputError(f"--dsnot-base has no effect with --method {args.method}; add --method dsnot or drop --dsnot-base")
    config = PruneConfig(
        method=args.method, sparsity=args.sparsity, pattern=args.pattern, calibration=args.calibration,
        n_samples=args.samples, seq_len=args.seq_len, seed=args.seed, skip=tuple(args.skip), owl=args.owl,
        head_sparsity=args.heads, dsnot_base=args.dsnot_base or "wanda",
    )
    if args.out:
        check_output(args.out, args.force)  # fail now, not after the work
    if args.compute_device:  # (prune checks it too; here it fails before the model loads)
        from .models.loading import check_device

        check_device(args.compute_device, "--compute-device")
    lm = _load(args)
    rows = []
    evaluate_kw = dict(seq_len=args.eval_seq_len, max_tokens=args.eval_max_tokens or None)
    if not args.no_eval:
        before = evaluate(lm, args.eval_text, **evaluate_kw)
        rows.append(("dense", inspect(lm), before))
    record = prune(lm, config, device=args.compute_device, checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    _say(f"pruned in {record['seconds']:.1f} s")
    if not args.no_eval:
        after = evaluate(lm, args.eval_text, **evaluate_kw)
        shape = config.pattern if config.pattern != "unstructured" else f"{config.sparsity:.0%}"
        rows.append((f"{config.method}{' +owl' if config.owl else ''} {shape}", inspect(lm), after))
        lm.record["pruning"]["evaluation"] = {"text": args.eval_text, "before": rows[0][2].to_dict(), "after": after.to_dict()}
        _table_before_after(lm.info.name, rows)
    else:
        report = inspect(lm)
        print(f"{lm.info.name}: {config.method} {config.pattern}: linear sparsity {report.linear_sparsity:.3f}, pattern {report.pattern}")
    if args.out:
        out = save_model(lm.model, lm.tokenizer, args.out, {"source": lm.source, **lm.record}, force=args.force)
        _say(f"saved to {out}")
    return 0


def _names(text: str, flag: str, example: str) -> list[str]:
    """The comma-separated task names of ``flag``; at least one."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    require(bool(names), f"{flag} {text!r} names no task; give e.g. {flag} {example}")
    return names


def cmd_eval(args) -> int:
    from .api import evaluate, evaluate_tasks

    # everything that can be checked without the model is checked before loading it
    _only_with(args, "activations", "--activations METHOD", ("activation_sparsity", "--activation-sparsity"),
               ("activation_allocation", "--activation-allocation"))
    _only_with(args, "longctx", "--longctx TASKS", ("lengths", "--lengths"), ("examples", "--examples"))
    _only_with(args, "tasks", "--tasks TASKS", ("include_path", "--include-path"), ("limit", "--limit"))
    _only_with(args, "attention", "--attention PATTERN", ("attention_set", "--attention-set"),
               ("attention_min_len", "--attention-min-len"), ("attention_layers", "--attention-layers"))
    if args.longctx and args.tasks:
        raise InputError("--longctx and --tasks are two different evaluations; run them one at a time")
    args.activation_sparsity = 0.5 if args.activation_sparsity is None else args.activation_sparsity
    args.activation_allocation = args.activation_allocation or "uniform"
    args.lengths, args.examples = args.lengths or "4096", args.examples or 4
    args.attention_min_len = args.attention_min_len or 4096
    if args.json_out:
        from .models import check_file_output

        check_file_output(args.json_out, "--json")
    if args.longctx:
        from .eval.longctx import TASKS

        longctx = _names(args.longctx, "--longctx", "needle,multikey")
        for task in longctx:
            TASKS.get(task)
        lengths = _int_list(args.lengths, "--lengths", positive=True)
    tasks = _names(args.tasks, "--tasks", "hellaswag") if args.tasks else []
    if args.attention:
        from .attention import make_pattern

        make_pattern(args.attention, **_settings(args.attention_set))
    if args.activations:
        from .activations import ACTIVATION_METHODS

        ACTIVATION_METHODS.get(args.activations)
    lm = _load(args)
    _apply_attention(lm, args)
    if args.activations:
        from .activations import apply as sparsify_activations

        handle = sparsify_activations(lm, args.activations, args.activation_sparsity, allocation=args.activation_allocation)
        handle.start_tracking()
        _say(f"activation sparsity: {args.activations} at {args.activation_sparsity:.0%}, {args.activation_allocation} "
             "allocation (calibrated on the shipped text)")
    if args.longctx:
        from .eval.longctx import evaluate_longctx

        results = evaluate_longctx(lm.model, lm.tokenizer, longctx, lengths, n=args.examples)
        _table("long-context (exact match)", ["task"] + [str(n) for n in lengths],
               [(t, *(f"{results['scores'][t][n]:.2f}" for n in lengths)) for t in longctx])
    elif tasks:
        results = evaluate_tasks(lm, tasks, include_path=args.include_path, limit=args.limit)
        _table("lm-eval", ["task", "metric", "value"], [(t, m, f"{v:.4f}") for t, ms in results.items() for m, v in ms.items()])
    else:
        result = evaluate(lm, args.text, seq_len=args.seq_len, max_tokens=args.max_tokens or None)
        results = {"perplexity": result.to_dict()}
        _table("perplexity", ["model", "text", "perplexity", "tokens", "windows x len"], [(lm.info.name, args.text, f"{result.perplexity:.3f}", str(result.tokens), f"{result.windows} x {result.seq_len}")])
    if args.activations:
        _say(f"activation sparsity measured during the evaluation: {handle.measured_sparsity():.1%}")
    if args.json_out:
        from .models import atomic_write_text

        atomic_write_text(args.json_out, json.dumps({"model": lm.source, "results": results}, indent=2) + "\n")
    return 0


def cmd_inspect(args) -> int:
    from .api import inspect

    lm = _load(args)
    report = inspect(lm)
    if args.json:
        print(json.dumps({"model": lm.info.__dict__, "record": lm.record, **report.to_dict()}, indent=2, default=str))
        return 0
    _table("model", ["name", "architecture", "parameters", "zero parameters", "decoder linear sparsity", "pattern"], [
        (lm.info.name, lm.info.architecture, f"{report.parameters:,}", f"{report.zero_parameters:,}", f"{report.linear_sparsity:.4f}", report.pattern)
    ])
    if report.warning:
        print(report.warning)
    if args.layers:
        _table("layers", ["layer", "shape", "sparsity", "pattern"], [(l.name, "x".join(map(str, l.shape)), f"{l.sparsity:.4f}", l.pattern) for l in report.layers])
    pruning = lm.record.get("pruning")
    if isinstance(pruning, dict):  # sparsa.json may have been edited by hand: say what is there
        calibration = pruning.get("calibration") if isinstance(pruning.get("calibration"), dict) else {}
        print(f"recorded: {pruning.get('method', '?')} {pruning.get('pattern', '?')} at {pruning.get('sparsity', '?')}, "
              f"calibrated on {calibration.get('source', '?')} ({calibration.get('tokens', '?')} tokens)")
    return 0


# -- output ----------------------------------------------------------------------------

def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _table(title: str, columns: list[str], rows: list[tuple]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*map(str, r))
    Console(width=max(100, Console().width)).print(table)


def _table_before_after(name: str, rows) -> None:
    base = rows[0][2].perplexity
    _table(f"{name}: perplexity on the evaluation text (sparsity of the decoder linears)", ["model", "sparsity", "pattern", "perplexity", "vs dense", "tokens"], [
        (label, f"{report.linear_sparsity:.3f}", report.pattern, f"{ppl.perplexity:.3f}", f"{ppl.perplexity / base:.2f}x", str(ppl.tokens))
        for label, report, ppl in rows
    ])


def _shape(text: str, k_multiple: int = 1, why: str = "") -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--shape {text!r} is not NxK; give out x in features, e.g. 4096x14336") from None
    if n <= 0 or k <= 0 or k % k_multiple:
        raise InputError(f"--shape {text}: both sizes must be positive" + (f" and K a multiple of {k_multiple} {why}" if k_multiple > 1 else ""))
    return n, k


def _fractions(text: str, flag: str) -> list[float]:
    try:
        return [_unit_interval(v) for v in text.split(",") if v.strip()] or [_unit_interval("")]
    except argparse.ArgumentTypeError as exc:
        raise InputError(f"{flag}: {exc}") from None


def cmd_bench(args) -> int:
    import torch

    if args.json_out:
        from .models import check_file_output

        check_file_output(args.json_out, "--json")
    if not torch.cuda.is_available():
        raise InputError(f"sparsa bench {args.what} needs a CUDA GPU (none found); run it on a GPU machine")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise InputError(f"sparsa bench {args.what} needs triton: pip install 'sparsa[gpu]'") from None
    result = {"linear": _bench_linear, "attention": _bench_attention, "activations": _bench_activations}[args.what](args)
    if args.json_out:
        from .benchmarking import environment
        from .models.saving import atomic_write_text

        atomic_write_text(args.json_out, json.dumps({**environment(), **result}, indent=1, default=str))
        _say(f"wrote {args.json_out}")
    if result.get("goals"):
        from .benchmarking import print_goals

        print_goals(result["goals"])
    return 0 if result.get("wrong", 0) == 0 else 1


def _bench_linear(args) -> dict:
    import warnings

    import torch

    from .kernels import bench_linear as bl

    tokens = _int_list(args.tokens, "--tokens", positive=True)
    shapes = [(args.model, *s) for s in bl.SHAPES[args.model]]
    if args.shape:
        shapes = [("-", "custom", *_shape(args.shape, 4, "for 2:4"))]
    warnings.filterwarnings("ignore", message=".*semi.?structured.*")
    cases = []
    _say(f"{torch.cuda.get_device_name()}, {args.dtype}; dispatch measured on first use and cached")
    print(bl.format_header(), flush=True)
    for model, layer, n, k in shapes:
        for case in bl.run_shape(model, layer, n, k, args.dtype, tokens, float(args.rep_ms)):
            cases.append(case)
            print(bl.format_case(case), flush=True)
    summary = bl.summarize(cases)
    print("\n".join(bl.format_summary(summary)))
    return {"summary": summary, "cases": cases, "wrong": summary["wrong"]}


def _bench_attention(args) -> dict:
    import torch

    from .attention import PATTERNS, make_pattern
    from .attention import bench as ab

    if args.heads % args.kv_heads:
        raise InputError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    lengths = _int_list(args.lengths, "--lengths", positive=True)
    if args.attention:
        patterns = [(args.attention, make_pattern(args.attention, block_size=128, **_settings(args.attention_set)))]
    elif args.attention_set:
        raise InputError("--attention-set needs --attention PATTERN")
    else:
        patterns = [(name, make_pattern(name, block_size=128)) for name in PATTERNS.names() if PATTERNS.get(name).phase == "prefill"]
    _say(f"{torch.cuda.get_device_name()}, bf16, {args.heads}/{args.kv_heads} heads of {args.head_dim}, blocks of 128; "
         "times in ms, speedups over SDPA (random inputs: threshold patterns keep most blocks)")
    rows, wrong = [], 0
    for length in lengths:
        q, k, v = ab.random_inputs(length, args.heads, args.kv_heads, args.head_dim, seed=length)
        dense = ab.dense_ms(q, k, v)
        mask = ab.random_mask(length, args.heads, 128, args.mask_sparsity)
        row = {"length": length, "dense_ms": dense, "mask_density": mask.density(), "backends": {}, "patterns": {}}
        print(f"L={length}: SDPA {dense:.2f}; random mask at {args.mask_sparsity:.0%} ({mask.density():.1%} of causal blocks):", flush=True)
        for backend in ("flex", "triton"):
            ms, error = ab.time_backend(q, k, v, mask, backend)
            wrong += error > 2e-2
            row["backends"][backend] = {"ms": ms, "error": error, "speedup": dense / ms}
            print(f"  {backend:8} {ms:8.2f} ({dense / ms:5.2f}x; ideal {1 / mask.density():5.2f}x) error {error:.1e}", flush=True)
        for name, pattern in patterns:
            p = row["patterns"][name] = ab.pattern_row(q, k, v, pattern, dense)
            print(f"  {name:16} estimate {p['estimate_ms']:7.2f} ({p['estimate_over_dense']:.1%} of SDPA), density "
                  f"{p['density']:.3f}, attend {p['attend_ms']:7.2f} -> {p['speedup_with_estimate']:.2f}x", flush=True)
        rows.append(row)
        del q, k, v, mask
        torch.cuda.empty_cache()
    return {"rows": rows, "wrong": wrong}


def _bench_activations(args) -> dict:
    import torch

    from .kernels import bench_gemv as bg

    levels = _fractions(args.activation_sparsity, "--activation-sparsity")
    shapes = [(text, *_shape(text)) for text in args.shape.split(",")] if args.shape else bg.SHAPES[args.model]
    _say(f"{torch.cuda.get_device_name()}, bf16, one token; CUDA-graph timed over weight copies that miss L2")
    print(f"{'layer':10} {'N x K':>12} {'cut':>5} {'dense us':>9} {'ours us':>9} {'dense/ours':>10} {'error':>8}  config", flush=True)
    rows, wrong = [], 0
    for label, n, k in shapes:
        x, ws, wts, g = bg.random_layer(n, k, n + k)
        for level in levels:
            thr, _, ref = bg.random_cut(x, ws[0], level, g)
            row = {"layer": label, "n": n, "k": k, "sparsity": level, **bg.gemv_row(x, ws, wts, thr, ref)}
            wrong += row["error"] > 1e-2
            rows.append(row)
            print(f"{label:10} {f'{n}x{k}':>12} {level:5.0%} {row['dense_us']:9.1f} {row['ours_us']:9.1f} "
                  f"{row['ours_speedup']:9.2f}x {row['error']:8.1e}  {row['config']}", flush=True)
        del ws, wts
        torch.cuda.empty_cache()
    return {"rows": rows, "wrong": wrong, "goals": bg.goals(rows)}


def _train_settings(pairs: list[str]) -> dict:
    from dataclasses import fields

    from .train import TrainConfig

    known = {f.name: f for f in fields(TrainConfig)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise InputError(f"--set {pair!r}: give KEY=VALUE with KEY one of: {', '.join(sorted(known))}")
        kind, words = {"int": (int, "a whole number"), "float": (float, "a number")}.get(str(known[key].type), (str, ""))
        try:
            out[key] = kind(value)
        except ValueError:
            raise InputError(f"--set {pair!r}: {key} must be {words}, e.g. {key}={known[key].default}") from None
    return out


def cmd_train(args) -> int:
    import copy
    import dataclasses

    from .api import evaluate, inspect, load_model, prune, train
    from .models import check_output, save_model
    from .train import TrainConfig
    from .train.loop import full_state_dict, rank, world

    given = {} if args.sparsity is None else {"sparsity": args.sparsity}
    config = TrainConfig(
        method=args.method, data=args.data, steps=args.steps, lr=args.lr, seq_len=args.seq_len, batch_size=args.batch_size,
        seed=args.seed, pattern=args.pattern, **given, **_train_settings(args.settings),
    )
    if args.resume and not args.checkpoint_dir:
        raise InputError("--resume needs --checkpoint-dir (the directory the interrupted run wrote)")
    if args.prune and args.teacher:
        raise InputError("--prune makes the dense model the teacher, so --teacher has no effect with it; drop one of them")
    if args.out:
        check_output(args.out, args.force)
    lm = _load(args)
    teacher = None
    if args.prune:
        teacher = copy.deepcopy(lm.model)
        record = prune(lm, method=args.prune, pattern=args.pattern, **given)
        _say(f"pruned with {args.prune} {args.pattern} in {record['seconds']:.1f} s")
    elif args.teacher:
        teacher = load_model(args.teacher, device=args.device, dtype=args.dtype).model
    evaluate_kw = dict(seq_len=args.eval_seq_len, max_tokens=args.eval_max_tokens or None)
    rows = []
    if not args.no_eval:
        rows.append(("before training", inspect(lm), evaluate(lm, args.eval_text, **evaluate_kw)))
    # under torchrun the model gets sharded: a plain CPU copy receives the gathered weights (on rank 0)
    plain = copy.deepcopy(lm.model).to("cpu") if world() > 1 else None
    record = train(lm, config, teacher=teacher, checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    if plain is not None:
        state = full_state_dict(lm.model)  # every process takes part
        if rank() == 0:
            plain.load_state_dict(state)
    trained = dataclasses.replace(lm, model=plain) if plain is not None else lm
    _say(f"trained {record['steps']} steps ({record['tokens']:,} tokens) in {record['seconds']:.1f} s; final loss {record['loss_curve'][-1]:.4f}" if record.get("loss_curve") else f"trained in {record['seconds']:.1f} s")
    if not args.no_eval:
        after = evaluate(lm, args.eval_text, **evaluate_kw)
        rows.append((f"after {args.method}", inspect(trained), after))
        lm.record["training"]["evaluation"] = {"text": args.eval_text, "before": rows[0][2].to_dict(), "after": after.to_dict()}
        _table_before_after(lm.info.name, rows)
    if args.out and rank() == 0:
        out = save_model(trained.model, lm.tokenizer, args.out, {"source": lm.source, **lm.record}, force=args.force)
        _say(f"saved to {out}")
    return 0


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "inspect": cmd_inspect, "bench": cmd_bench}
COMMANDS["train"] = cmd_train


EPILOG_FRONTIER = """\
examples:
  sparsa frontier                                # the default sweep on the embedded SmolLM2-135M (~15 configurations)
  sparsa frontier ./my-llama --config sweep.toml --out my-frontier
  sparsa frontier --out runs/f1                  # interrupted? the same command resumes (--fresh starts over)
  sparsa frontier --max-tokens 2048              # a quicker, noisier perplexity per configuration
  sparsa frontier BIG --device cuda --ray auto   # one Ray task per GPU of a running cluster (--ray local: in-process)

Each configuration (weights x attention x activations, and combinations)
gets a fresh copy of the model, is made sparse, evaluated (perplexity;
long-context and lm-eval tasks where the sweep names them) and timed: on a
CUDA model speed is measured (prefill ms; decode tokens/s from a CUDA graph
where the step captures, and eagerly, as Hugging Face generate runs);
otherwise it is PREDICTED from the GPU measurements stored in
benchmarks/results/*.json.
OUT/results.jsonl gets one line per configuration as it finishes; the report
is OUT/frontier.png, OUT/report.html and the Pareto table printed here.

sweep.toml (every key is checked; start from sparsa/frontier/default_sweep.toml):
  [eval]        text, seq_len, perplexity_tokens, longctx_tasks, longctx_length, lm_eval_tasks ...
  [calibration] samples, seq_len, seed (pruning and activation thresholds)
  [speed]       mode = "auto" | "predicted" | "measured", prefill_tokens, decode_context, decode_tokens,
                cuda_graph = true (measured decode also replayed from a CUDA graph: the GPU's work)
  [sweep]       dense = true, cross = false (every combination of the axes, or each entry alone)
  [axes]        weights = [{method = ["wanda", "sparsegpt"], pattern = "2:4"}]   # lists expand
                attention = [{method = "vertical_slash", vertical = 256, slash = 256, min_len = 1024}]
                activations = [{method = "cats", sparsity = [0.4, 0.5]}]
  [[combine]]   weights = {method = "wanda", pattern = "2:4"}
                activations = {method = "cats", sparsity = 0.5}
"""


def _add_frontier_parser(sub) -> None:
    p = sub.add_parser("frontier", help="sweep sparsity configurations: Pareto table, plots, HTML report", description="Sweep weight, attention and activation sparsity (and combinations) on one model; report the Pareto frontier of accuracy against speedup.", epilog=EPILOG_FRONTIER, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arg(p)
    p.add_argument("--config", default=None, metavar="SWEEP.toml", help="the sweep (default: the shipped default sweep)")
    p.add_argument("--out", default="frontier", help="folder for results.jsonl, frontier.png and report.html (default: frontier)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", dest="fresh", action="store_false", default=False, help="skip configurations already in OUT/results.jsonl (the default)")
    group.add_argument("--fresh", dest="fresh", action="store_true", help="discard OUT/results.jsonl and start over")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="run configurations as Ray tasks on this cluster (auto, HOST:PORT, ray://...), or 'local' for an in-process Ray")
    p.add_argument("--max-tokens", type=_tokens, default=None, help="perplexity tokens per configuration, overriding the sweep; 0 for all")
    p.add_argument("--all", dest="all_rows", action="store_true", help="print every configuration, not only the Pareto set")


def cmd_frontier(args) -> int:
    from .api import frontier
    from .models import check_output

    if args.config is not None and not os.path.isfile(args.config):
        raise InputError(f"--config {args.config}: no such file; pass a sweep TOML (see: sparsa frontier --help)")
    check_output(args.out, force=True)  # an existing folder is resumed
    result = frontier(args.model, args.config, out=args.out, fresh=args.fresh, ray=args.ray, device=args.device,
                      dtype=args.dtype, max_tokens=args.max_tokens, all_rows=args.all_rows)
    _say(f"wrote {result.results}, {result.png or '(no plot: pip install sparsa[frontier])'} and {result.html}")
    return 0 if all(r.get("status") == "ok" for r in result.records) else 1


COMMANDS["frontier"] = cmd_frontier


def _close_progress_bars() -> None:
    """End the progress bars an error interrupted, so that its message starts on a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return COMMANDS[args.command](args)
    except SparsaError as e:
        _close_progress_bars()
        print(f"sparsa: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        _close_progress_bars()
        print("sparsa: interrupted (a run with --checkpoint-dir continues with --resume)", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback for the user, unless asked
        if os.environ.get("SPARSA_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        _close_progress_bars()
        print(f"sparsa: internal error: {type(e).__name__}: {first} (rerun with SPARSA_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
