"""Calibrate activation thresholds on text and install them in a model (forward hooks, removable)."""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn as nn

from ..errors import require
from .base import ACTIVATION_METHODS, WEIGHT_POWERS, ActivationConfig, Site, threshold_at

__all__ = ["ActivationSparsity", "apply", "score_samples"]


@dataclasses.dataclass
class ActivationSparsity:
    """The installed sites of one model: thresholds, hooks, and measured sparsity while tracking."""

    config: ActivationConfig
    sites: list[Site]
    handles: list = dataclasses.field(default_factory=list)
    track: bool = False

    def thresholds(self) -> dict[str, float]:
        return {s.name: s.threshold for s in self.sites}

    def measured_sparsity(self) -> float:
        """Fraction of activations zeroed since tracking started (over every site)."""
        total = sum(s.total for s in self.sites)
        return sum(s.zeros for s in self.sites) / total if total else 0.0

    def measured_weight_sparsity(self) -> float:
        """The same, each site weighted by the weights its cut lets a kernel skip (what decoding speed follows)."""
        pairs = [(s.zeros / s.total, s.weight_numel() or 1) for s in self.sites if s.total]
        return sum(f * w for f, w in pairs) / sum(w for _, w in pairs) if pairs else 0.0

    def start_tracking(self) -> None:
        for s in self.sites:
            s.zeros = s.total = 0
        self.track = True

    def install(self) -> None:
        """(Re)install one hook per site."""
        self.remove()
        self.handles = [s.install(lambda: self.track) for s in self.sites]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _calibrate(model: nn.Module, sites: list[Site], batches: torch.Tensor, config: ActivationConfig,
               dense: dict[str, torch.Tensor] | None = None) -> None:
    """Each site's threshold: the ``sparsity`` quantile of its scores over a random sample of calibration activations.

    Two passes: the first on the dense model (its samples ``dense``, if
    already taken); the second with the first pass's cuts in place, since
    cutting early layers shifts what later layers see (the deployed model
    sees the shifted activations).
    """
    _set_thresholds(sites, score_samples(model, sites, batches, config) if dense is None else dense, config)
    if config.sparsity > 0:
        owner = ActivationSparsity(config, sites)
        owner.install()
        try:
            _set_thresholds(sites, score_samples(model, sites, batches, config), config)
        finally:
            owner.remove()


def _set_thresholds(sites: list[Site], samples: dict[str, torch.Tensor], config: ActivationConfig) -> None:
    for site in sites:
        site.threshold = threshold_at(samples[site.name], config.sparsity if site.sparsity is None else site.sparsity)


def score_samples(model: nn.Module, sites: list[Site], batches: torch.Tensor, config: ActivationConfig) -> dict[str, torch.Tensor]:
    """Per site, a random sample of its scores over the calibration batches (cuts already installed apply), sorted."""
    gen = torch.Generator().manual_seed(config.seed)
    samples: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}

    def collect(site):
        def take(x):
            scores = site.score(x.detach()).float().reshape(-1).cpu()
            if scores.numel() > config.values_per_batch:
                scores = scores[torch.randint(0, scores.numel(), (config.values_per_batch,), generator=gen)]
            samples[site.name].append(scores)

        # prepend: the scores are taken before this site's own cut, if installed
        if site.kind == "input":
            return site.module.register_forward_pre_hook(lambda m, args: take(args[0]), prepend=True)
        return site.module.register_forward_hook(lambda m, args, out: take(out), prepend=True)

    handles = [collect(s) for s in sites]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for row in batches:
                model(row[None].to(device))
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(values).sort().values for name, values in samples.items()}


def apply(lm, method: str = "teal", sparsity: float = 0.5, *, tokenizer=None, text: str | None = None, **options) -> ActivationSparsity:
    """Calibrate ``method`` at ``sparsity`` on text and install it in ``lm`` (a LoadedModel, or a model with ``tokenizer``).

    ``text`` defaults to the shipped calibration text. Options are
    :class:`ActivationConfig` fields (``targets``, ``samples``, ``seq_len``,
    ``seed``, ``allocation``, ...). Returns the handle; ``.remove()`` restores the dense model.
    Sparsity 0 installs nothing that changes the output.
    """
    from ..data.calibration import calibration_samples, held_out_samples
    from ..data.text import load_text

    from ..models.loading import LoadedModel

    model = lm.model if isinstance(lm, LoadedModel) else lm
    tokenizer = tokenizer or (lm.tokenizer if isinstance(lm, LoadedModel) else None)
    require(tokenizer is not None, "activation sparsity calibrates on text: pass a LoadedModel or tokenizer=")
    config = ActivationConfig(method=method, sparsity=sparsity, **options)
    make_sites = ACTIVATION_METHODS.get(config.method)
    body = text if text is not None else load_text(config.calibration if config.calibration != "shipped" else "calibration")
    batches = calibration_samples(tokenizer, body, config.samples, config.seq_len, config.seed)
    if getattr(make_sites, "weight_informed", False) and config.weight_power is None and config.sparsity > 0:
        check = held_out_samples(tokenizer, body, config.samples, config.seq_len, config.seed)
        config = dataclasses.replace(config, weight_power=_best_weight_power(model, batches, check, config))
    sites = make_sites(model, config, batches)
    dense = None
    if config.allocation == "greedy" and config.sparsity > 0:
        from .allocation import greedy_levels

        dense = score_samples(model, sites, batches, config)
        levels = greedy_levels(model, sites, batches, config, dense)
        for site in sites:
            site.sparsity = levels[site.name]
    if any(type(s.module).__name__ == "SparseLinear24" for s in sites):
        warnings.warn("sparsa.activations: inputs of 2:4 layers are cut too, but the 2:4 kernels read every weight "
                      "group regardless, so the two sparsities do not combine into more speed", RuntimeWarning, stacklevel=2)
    _calibrate(model, sites, batches, config, dense)
    handle = ActivationSparsity(config, sites)
    handle.install()
    return handle


def _best_weight_power(model: nn.Module, batches: torch.Tensor, check: torch.Tensor, config: ActivationConfig) -> float:
    """The weight power whose calibration (on ``batches``) gives the lowest loss on ``check``, held-out calibration text."""
    device = next(model.parameters()).device
    losses = {}
    for power in WEIGHT_POWERS:
        trial = dataclasses.replace(config, weight_power=power)
        sites = ACTIVATION_METHODS.get(trial.method)(model, trial, batches)
        _calibrate(model, sites, batches, trial)
        handle = ActivationSparsity(trial, sites)
        handle.install()
        try:
            with torch.no_grad():
                losses[power] = sum(float(model(row[None].to(device), labels=row[None].to(device)).loss) for row in check)
        finally:
            handle.remove()
    return min(losses, key=losses.get)
