"""Greedy per-layer sparsity allocation (as TEAL proposes): more sparsity where a layer's output moves least.

A uniform target cuts every site equally, yet some inputs (say, the down
projection's) tolerate much more than others. Layer by layer, on the dense
model's own inputs to that layer, every site starts uncut; each step tries
raising each site by ``greedy_step`` and keeps the one whose rise costs the
least output error per weight it lets a kernel skip, until the layer's
weight-weighted mean sparsity reaches the target (the last step is trimmed to
land on it). The layer's speed saving is therefore the uniform one; only its
distribution changes. The error is the relative squared error of the layer's
output against its dense output.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..prune.pipeline import capture_layer_inputs, run_layer
from .base import ActivationConfig, Site, threshold_at

__all__ = ["greedy_levels"]

MAX_LEVEL = 0.95  # no site is cut beyond this


def greedy_levels(model: nn.Module, sites: list[Site], batches: torch.Tensor, config: ActivationConfig,
                  samples: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each site's sparsity, found layer by layer; ``samples``: each site's sorted dense scores."""
    from ..models.adapters import adapter_for

    rows = max(1, min(len(batches), -(-config.greedy_tokens // batches.shape[1])))
    device = str(next(model.parameters()).device)
    hidden, layer_kwargs = capture_layer_inputs(model, batches[:rows], device)
    by_layer: dict[int, list[Site]] = {}
    for site in sites:
        by_layer.setdefault(int(re.search(r"(?:^|\.)layers\.(\d+)\.", site.name).group(1)), []).append(site)
    levels: dict[str, float] = {}
    layers = adapter_for(model).layers(model)
    with torch.no_grad():
        for index, layer in enumerate(tqdm(layers, desc=f"greedy allocation ({config.method})", leave=False)):
            dense = run_layer(layer, list(hidden), layer_kwargs[index])
            if index in by_layer:
                levels.update(_greedy_layer(layer, by_layer[index], hidden, layer_kwargs[index], dense, samples, config))
            hidden = dense
    return levels


def _greedy_layer(layer, sites: list[Site], hidden, kwargs, dense, samples, config: ActivationConfig) -> dict[str, float]:
    weights = {s.name: s.weight_numel() or 1 for s in sites}
    total = sum(weights.values())
    level = {s.name: 0.0 for s in sites}
    dense_energy = sum(float(d.float().pow(2).sum()) for d in dense)

    def error(trial: dict[str, float]) -> float:
        for s in sites:
            s.threshold = threshold_at(samples[s.name], trial[s.name])
        handles = [s.install() for s in sites]
        try:
            out = run_layer(layer, list(hidden), kwargs)
        finally:
            for h in handles:
                h.remove()
        return sum(float((o - d).float().pow(2).sum()) for o, d in zip(out, dense)) / dense_energy

    def mean(trial: dict[str, float]) -> float:
        return sum(weights[n] * v for n, v in trial.items()) / total

    current, last = 0.0, None
    while mean(level) < config.sparsity - 1e-9:
        best = None
        for s in sites:
            if level[s.name] + config.greedy_step > MAX_LEVEL + 1e-9:
                continue
            trial = dict(level, **{s.name: level[s.name] + config.greedy_step})
            e = error(trial)
            cost = (e - current) / weights[s.name]
            if best is None or cost < best[0]:
                best = (cost, s.name, e)
        if best is None:
            break
        _, last, current = best
        level[last] += config.greedy_step
    overshoot = mean(level) - config.sparsity
    if last is not None and overshoot > 0:  # trim the last rise so the layer lands on the target
        level[last] -= overshoot * total / weights[last]
    for s in sites:
        s.threshold = None
    return level
