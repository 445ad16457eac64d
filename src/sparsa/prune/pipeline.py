"""Layer-by-layer calibration: the pipeline every weight-pruning method runs in.

1. Calibration samples go through the embeddings once; every decoder layer's
   call arguments (masks, rotary embeddings) are recorded on the way.
2. For each decoder layer in turn: move it to the compute device, feed it the
   outputs of the already-pruned layers before it, let each linear's pruner
   collect statistics, prune, recompute the layer's outputs, move it back.
   Only one decoder layer is on the accelerator at a time, so a model far
   larger than the GPU prunes on it.
3. After each layer a checkpoint (pruned weights, next inputs, progress) is
   written atomically; ``resume=True`` continues from it and gives the same
   result as an uninterrupted run.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.nn as nn
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..data import calibration_samples, load_text
from ..errors import InputError, ModelError
from ..models import LoadedModel, adapter_for, atomic_save_tensors, atomic_write_text, count_parameters, linear_layers
from .base import METHODS
from .config import PruneConfig
from .owl import outlier_ratio, owl_budgets
from .patterns import require_nm_fits, sparsity_of


@dataclass
class Calibration:
    """Inputs of the first decoder layer and each layer's call arguments, per micro-batch."""

    hidden: list[torch.Tensor]  # [micro-batch, L, hidden] each
    layer_kwargs: list[list[dict]]  # [layer][micro-batch] -> kwargs
    tokens: int
    text_sha256: str


class _Stop(Exception):
    pass


def prune_model(
    lm: LoadedModel,
    config: PruneConfig,
    *,
    device: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    micro_batch: int | None = None,
    samples: torch.Tensor | None = None,
) -> dict:
    """Prune ``lm.model`` in place; returns the record written to sparsa.json.

    ``samples`` ([N, L] token ids) replaces the calibration text when given.
    ``micro_batch`` samples go through a layer at once (default: about 4096 tokens' worth).
    """
    model = lm.model
    adapter = adapter_for(model)
    if device is not None:
        from ..models.loading import check_device

        check_device(device, "device (--compute-device)")
    device = device or str(next(model.parameters()).device)
    started = time.perf_counter()
    targets = _targets(model, adapter, config)
    _check_finite(targets)
    if config.method not in METHODS:
        METHODS.get(config.method)  # raises the one-line error listing the methods
    if config.nm:
        _check_nm_divides(targets, config.nm)

    micro_batch = micro_batch or max(1, 4096 // config.seq_len)
    calib = capture(lm, config, device, micro_batch, samples)
    parameters_before = count_parameters(model)
    if config.pattern == "structured":
        report = _structured(lm, config, calib, device, progress)
        budgets = None
    else:
        state = _Checkpoint(checkpoint_dir, config, calib.text_sha256) if checkpoint_dir else None  # a bad directory fails before the work
        budgets = _owl(model, config, calib, targets, device, progress) if config.owl else None
        report = _sequential(lm, config, calib, targets, budgets, device, state, resume, progress)
    record = {
        "method": config.method,
        "pattern": config.pattern,
        "sparsity": config.sparsity,
        "config": config.to_dict(),
        "calibration": {
            "source": config.calibration,
            "samples": config.n_samples,
            "seq_len": config.seq_len,
            "tokens": calib.tokens,
            "text_sha256": calib.text_sha256,
            "seed": config.seed,
        },
        "layer_budgets": budgets,
        "parameters_before": parameters_before,
        "parameters_after": count_parameters(model),
        "seconds": round(time.perf_counter() - started, 2),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **report,
    }
    lm.record = {**lm.record, "pruning": record}
    return record


# -- what gets pruned ---------------------------------------------------------------

def _targets(model: nn.Module, adapter, config: PruneConfig) -> list[dict[str, nn.Linear]]:
    """Per decoder layer, the linears to prune (qualified name -> module), --skip applied."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for pattern in config.skip:
        if pattern != "lm_head" and not any(_skipped(name, (pattern,)) for name in names):  # (lm_head: the default)
            raise InputError(f"--skip {pattern!r} matches no linear layer of this model; give exact names, suffixes such as "
                             "down_proj or globs such as 'model.layers.0.*' (sparsa inspect MODEL --layers lists them)")
    out = []
    for i, layer in enumerate(adapter.layers(model)):
        linears = linear_layers(layer, adapter.layer_prefix(i))
        out.append({name: m for name, m in linears.items() if not _skipped(name, config.skip)})
    return out


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatch(name, p) for p in patterns)


def _check_finite(targets: list[dict[str, nn.Linear]]) -> None:
    for linears in targets:
        for name, m in linears.items():
            if not torch.isfinite(m.weight).all():
                raise ModelError(f"{name} has NaN or Inf weights; the model is damaged: reload it from a good copy")


def _check_nm_divides(targets: list[dict[str, nn.Linear]], nm: tuple[int, int]) -> None:
    for linears in targets:
        for name, layer in linears.items():
            require_nm_fits(layer.in_features, *nm, name=name)


# -- calibration capture ------------------------------------------------------------

@torch.no_grad()
def capture(lm: LoadedModel, config: PruneConfig, device: str, micro_batch: int = 8, samples: torch.Tensor | None = None) -> Calibration:
    """Embed the calibration samples and record every decoder layer's call arguments."""
    if samples is None:
        source = "calibration" if config.calibration == "shipped" else config.calibration
        text = load_text(source)
        samples = calibration_samples(lm.tokenizer, text, config.n_samples, config.seq_len, config.seed)
        digest = hashlib.sha256(text.encode()).hexdigest()
    else:
        digest = hashlib.sha256(samples.cpu().numpy().tobytes()).hexdigest()
    hidden, layer_kwargs = capture_layer_inputs(lm.model, samples, device, micro_batch)
    return Calibration(hidden, layer_kwargs, samples.numel(), digest)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, samples: torch.Tensor, device: str, micro_batch: int = 8) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """The first decoder layer's inputs and every layer's keyword arguments, per micro-batch of ``samples``.

    Only the embeddings run: the first layer's call is recorded and the rest
    of the model is skipped, so any model size fits.
    """
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    base = getattr(model, model.base_model_prefix)
    hidden: list[torch.Tensor] = []
    layer_kwargs: list[list[dict]] = [[] for _ in layers]

    def recorder(index: int):
        def forward(hidden_states, *args, **kwargs):
            if index == 0:
                hidden.append(hidden_states)
            kwargs.pop("past_key_values", None)  # the cache, by its name before transformers 5.25 and after
            kwargs.pop("cache", None)
            kwargs["use_cache"] = False
            layer_kwargs[index].append(kwargs)
            if index == len(layers) - 1:
                raise _Stop
            return hidden_states

        return forward

    moved = _move_outside_layers(base, layers, device)
    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        for start in range(0, len(samples), micro_batch):
            try:
                base(input_ids=samples[start : start + micro_batch].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for layer in layers:
            del layer.forward
        _move_back(moved)
    return hidden, layer_kwargs


def _move_outside_layers(base: nn.Module, layers: nn.ModuleList, device: str) -> list[tuple[nn.Module, torch.device]]:
    """Put the modules that run before the decoder layers (embeddings, rotary) on ``device``."""
    moved = []
    for child in base.children():
        if child is layers:
            continue
        params = list(child.parameters()) + list(child.buffers())
        if params and params[0].device != torch.device(device):
            moved.append((child, params[0].device))
            child.to(device)
    return moved


def _move_back(moved: list[tuple[nn.Module, torch.device]]) -> None:
    for module, where in moved:
        module.to(where)


# -- the sequential pass -------------------------------------------------------------

def run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """Replace each micro-batch of ``hidden`` by the layer's output, so inputs and outputs never coexist."""
    for j, kw in enumerate(kwargs):
        out = layer(hidden[j], **kw)
        hidden[j] = out[0] if isinstance(out, tuple) else out
    return hidden


def _collect(layer: nn.Module, hidden, kwargs, linears: dict[str, nn.Linear], sink) -> None:
    """Run ``layer`` over the calibration inputs, handing each linear's input to ``sink(name, x)``."""
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: sink(n, args[0])) for name, m in linears.items()]
    try:
        for h, kw in zip(hidden, kwargs):
            layer(h, **kw)  # outputs dropped at once: only the statistics are wanted
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _sequential(lm, config, calib, targets, budgets, device, state, resume, progress) -> dict:
    model = lm.model
    layers = adapter_for(model).layers(model)
    method = METHODS.get(config.method)
    # The pass owns the captured inputs: outputs replace them as it goes, so
    # only one set of activations is ever alive.
    hidden, calib.hidden = [h.to(device) for h in calib.hidden], []
    first = 0
    if resume:
        if state is None:
            raise InputError("--resume needs --checkpoint-dir (the directory the interrupted run wrote)")
        first, hidden = state.load(layers, device)
    per_layer: dict[str, float] = {}
    bar = tqdm(range(len(layers)), desc=f"{config.method} {config.pattern}", unit="layer", disable=not progress, initial=first)
    for i in range(first, len(layers)):
        layer = layers[i]
        home = next(layer.parameters()).device
        layer.to(device)
        linears = targets[i]
        sparsity = budgets[i] if budgets else config.sparsity
        pruners = {name: method(m, config, name) for name, m in linears.items()}
        if any(p.needs_inputs for p in pruners.values()):
            _collect(layer, hidden, calib.layer_kwargs[i], linears, lambda n, x: pruners[n].add_batch(x))
        for name, pruner in pruners.items():
            mask = pruner.prune(sparsity)
            per_layer[name] = sparsity_of(mask)
            pruner.free()
        hidden = run_layer(layer, hidden, calib.layer_kwargs[i])
        _check_hidden(hidden, i)
        layer.to(home)
        if state:
            state.save(i, layer, hidden)
        bar.set_postfix(layer=i, sparsity=f"{sparsity:.2f}", refresh=False)
        bar.update(1)
    bar.close()
    if state:
        state.finish()
    pruned = [n for t in targets for n in t]
    return {"layer_sparsity": per_layer or None, "pruned_linears": len(pruned), "resumed_from_layer": first if resume else None}


def _check_hidden(hidden: list[torch.Tensor], index: int) -> None:
    if not all(torch.isfinite(h).all() for h in hidden):
        raise ModelError(
            f"decoder layer {index} produced NaN or Inf activations on the calibration text; "
            "use float32 or bfloat16 instead of float16 (--dtype), or check the model's weights"
        )


# -- OWL: outlier-weighted layerwise budgets ------------------------------------------

@torch.no_grad()
def activation_norms(model, calib: Calibration, names: list[dict[str, nn.Linear]] | None, device: str, progress: bool, what: str) -> list[dict[str, torch.Tensor]]:
    """A dense layer-by-layer pass returning, per layer, each linear's input-column L2 norms."""
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    hidden = [h.to(device) for h in calib.hidden]
    result = []
    for i in tqdm(range(len(layers)), desc=what, unit="layer", disable=not progress):
        layer = layers[i]
        home = next(layer.parameters()).device
        layer.to(device)
        linears = names[i] if names else linear_layers(layer, adapter.layer_prefix(i))
        sums = {n: torch.zeros(m.in_features, dtype=torch.float64, device=device) for n, m in linears.items()}

        def sink(name, x):
            sums[name] += x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)

        _collect(layer, hidden, calib.layer_kwargs[i], linears, sink)
        hidden = run_layer(layer, hidden, calib.layer_kwargs[i])
        layer.to(home)
        result.append({n: s.sqrt().float().cpu() for n, s in sums.items()})
    return result


def _owl(model, config, calib, targets, device, progress) -> list[float]:
    norms = activation_norms(model, calib, targets, device, progress, "OWL outliers")
    ratios, sizes = [], []
    for linears, layer_norms in zip(targets, norms):
        scores = torch.cat([(m.weight.detach().float().abs().cpu() * layer_norms[n]).flatten() for n, m in linears.items()])
        ratios.append(outlier_ratio(scores, config.owl_threshold))
        sizes.append(sum(m.weight.numel() for m in linears.values()))
    return owl_budgets(ratios, config.sparsity, config.owl_lambda, weights=sizes)


def _structured(lm, config, calib, device, progress) -> dict:
    from .structured import StructuredConfig, prune_structured

    norms = activation_norms(lm.model, calib, None, device, progress, "structured importance")
    flat = {name: n for layer in norms for name, n in layer.items()}
    structured = StructuredConfig(ffn_sparsity=config.sparsity, head_sparsity=config.head_sparsity)
    return {"structured": prune_structured(lm.model, structured, flat)}


# -- checkpoints (the training loop uses these helpers too) ----------------------------

T = TypeVar("T")


def checkpoint_directory(directory: str | os.PathLike) -> Path:
    """``directory``, created if missing; a one-line InputError when it cannot hold checkpoints."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "a file has that name" if path.is_file() else e.strerror
        raise InputError(f"cannot use {path} as the checkpoint directory ({why}); choose another --checkpoint-dir / checkpoint_dir=") from None
    return path


def read_checkpoint(path: Path, read: Callable[[Path], T]) -> T:
    """``read(path)``; a one-line InputError naming the file when it is missing or damaged."""
    try:
        return read(path)
    except Exception as e:  # whatever the reader raises, the file cannot be used
        why = getattr(e, "strerror", None) or str(e).strip().split("\n")[0][:200] or type(e).__name__
        raise InputError(f"checkpoint {path} is corrupt ({why}); delete the checkpoint directory or run without --resume / resume= to start over") from None


class _Checkpoint:
    """Per-layer checkpoint: pruned layer weights, the next layer's inputs, progress."""

    def __init__(self, directory, config: PruneConfig, text_sha256: str) -> None:
        self.dir = checkpoint_directory(directory)
        self.key = {"config": config.to_dict(), "text_sha256": text_sha256}

    def save(self, index: int, layer: nn.Module, hidden: list[torch.Tensor]) -> None:
        weights = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        atomic_save_tensors(weights, self.dir / f"layer_{index:04d}.safetensors")
        atomic_save_tensors({f"h{j}": h.cpu().contiguous() for j, h in enumerate(hidden)}, self.dir / "inputs.safetensors")
        atomic_write_text(self.dir / "state.json", json.dumps({**self.key, "next_layer": index + 1}, default=str))

    def load(self, layers: nn.ModuleList, device: str) -> tuple[int, list[torch.Tensor]]:
        path = self.dir / "state.json"
        if not path.is_file():
            raise InputError(f"no checkpoint in {self.dir} to resume from; run without --resume to start")
        state = read_checkpoint(path, lambda p: json.loads(p.read_text()))
        if state["config"] != json.loads(json.dumps(self.key["config"], default=str)) or state["text_sha256"] != self.key["text_sha256"]:
            raise InputError(f"the checkpoint in {self.dir} was made with other settings or text; rerun with the same flags, or delete it to start over")
        done = state["next_layer"]
        for i in range(done):
            weights = read_checkpoint(self.dir / f"layer_{i:04d}.safetensors", load_file)
            layers[i].load_state_dict(weights, strict=True)
        saved = read_checkpoint(self.dir / "inputs.safetensors", lambda p: load_file(p, device=device))
        return done, [saved[f"h{j}"] for j in range(len(saved))]

    def finish(self) -> None:
        state = json.loads((self.dir / "state.json").read_text())
        atomic_write_text(self.dir / "state.json", json.dumps({**state, "complete": True}))
