"""Calibrate activation thresholds on text and install them in a model (forward hooks, removable)."""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import require
from .base import ACTIVATION_METHODS, WEIGHT_POWERS, ActivationConfig, Site, threshold_at

__all__ = ["ActivationSparsity", "InputSample", "apply", "input_samples"]


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
               dense: dict[str, InputSample] | None = None) -> None:
    """Each site's threshold: the ``sparsity`` quantile of its scores over a random sample of calibration activations.

    Two passes: the first on the dense model (its samples ``dense``, if
    already taken); the second with the first pass's cuts in place, since
    cutting early layers shifts what later layers see (the deployed model
    sees the shifted activations).
    """
    _set_thresholds(sites, input_samples(model, sites, batches, config) if dense is None else dense, config)
    if config.sparsity > 0:
        owner = ActivationSparsity(config, sites)
        owner.install()
        try:
            _set_thresholds(sites, input_samples(model, sites, batches, config), config)
        finally:
            owner.remove()


def _set_thresholds(sites: list[Site], samples: dict[str, InputSample], config: ActivationConfig) -> None:
    for site in sites:
        site.threshold = threshold_at(samples[site.name].scores(site.scale), config.sparsity if site.sparsity is None else site.sparsity)


@dataclasses.dataclass(frozen=True)
class InputSample:
    """A random sample of what one site sees: ``|x|`` (float32) and the channel each value came from.

    Kept apart from the score so that one pass over the text serves every
    weight power the calibration tries (the score is ``|x_j| * scale_j``).
    """

    values: torch.Tensor
    channels: torch.Tensor

    def scores(self, scale: torch.Tensor | None) -> torch.Tensor:
        """The sample's scores under a per-channel ``scale`` (None: ``|x|``), sorted."""
        scores = self.values if scale is None else self.values * scale.detach().float().cpu()[self.channels]
        return scores.sort().values


def input_samples(model: nn.Module, sites: list[Site], batches: torch.Tensor, config: ActivationConfig) -> dict[str, InputSample]:
    """Per site, a random sample of ``|x|`` over the calibration batches (cuts already installed apply)."""
    gen = torch.Generator().manual_seed(config.seed)
    values: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    channels: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}

    def collect(site):
        def take(x):
            flat = x.detach().abs().float().reshape(-1).cpu()
            index = torch.arange(flat.numel())
            if flat.numel() > config.values_per_batch:
                index = torch.randint(0, flat.numel(), (config.values_per_batch,), generator=gen)
            values[site.name].append(flat[index])
            channels[site.name].append((index % x.shape[-1]).to(torch.int32))

        # prepend: the values are taken before this site's own cut, if installed
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
    return {name: InputSample(torch.cat(values[name]), torch.cat(channels[name])) for name in values}


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
    sites = dense = None
    if getattr(make_sites, "weight_informed", False) and config.weight_power is None and config.sparsity > 0:
        check = held_out_samples(tokenizer, body, config.samples, config.seq_len, config.seed)
        power, sites, dense = _best_weight_power(model, make_sites, batches, check, config)
        config = dataclasses.replace(config, weight_power=power)
    if sites is None or config.allocation != "uniform":  # else the power search calibrated them already
        sites = make_sites(model, config, batches)
        if config.allocation == "greedy" and config.sparsity > 0:
            from .allocation import greedy_levels

            if dense is None:  # (the power search's dense sample is the same: same modules, same seed)
                dense = input_samples(model, sites, batches, config)
            levels = greedy_levels(model, sites, batches, config, {s.name: dense[s.name].scores(s.scale) for s in sites})
            for site in sites:
                site.sparsity = levels[site.name]
        _calibrate(model, sites, batches, config, dense)
    if any(type(s.module).__name__ == "SparseLinear24" for s in sites):
        warnings.warn("sparsa.activations: inputs of 2:4 layers are cut too, but the 2:4 kernels read every weight "
                      "group regardless, so the two sparsities do not combine into more speed", RuntimeWarning, stacklevel=2)
    handle = ActivationSparsity(config, sites)
    handle.install()
    return handle


def _best_weight_power(model: nn.Module, make_sites, batches: torch.Tensor, check: torch.Tensor,
                       config: ActivationConfig) -> tuple[float, list[Site], dict[str, InputSample]]:
    """The weight power whose calibration (on ``batches``) moves the model least on ``check``, held-out
    calibration text, its calibrated sites (uniform allocation), and the dense model's input sample the
    calibrations shared. Ties go to the smaller power.

    "Least" is the divergence KL(dense || cut) of the next-token distributions,
    summed over ``check``'s tokens: what the cut changes, compared token by
    token with the same model dense. The loss on ``check`` would also count
    how well the model happens to predict that text, and the calibration text
    is not the text the model will serve: on SmolLM2-135M the power with the
    lowest loss there was often not the one with the lowest perplexity on
    other text, while the divergence chose better (README, Measured results).
    """
    device = next(model.parameters()).device
    dense = None  # |x| on the dense model does not depend on the power: one pass serves them all
    trials = []
    for power in WEIGHT_POWERS:
        trial = dataclasses.replace(config, weight_power=power, allocation="uniform")
        sites = make_sites(model, trial, batches)
        if dense is None:
            dense = input_samples(model, sites, batches, trial)
        _calibrate(model, sites, batches, trial, dense)
        trials.append(ActivationSparsity(trial, sites))
    divergence = [0.0] * len(trials)
    with torch.no_grad():
        for row in check:
            ids = row[None].to(device)
            reference = F.log_softmax(model(ids).logits.float(), dim=-1)
            for i, handle in enumerate(trials):
                handle.install()
                try:
                    cut = F.log_softmax(model(ids).logits.float(), dim=-1)
                finally:
                    handle.remove()
                divergence[i] += float(F.kl_div(cut, reference, log_target=True, reduction="sum"))
    best = trials[min(range(len(trials)), key=divergence.__getitem__)]
    return best.config.weight_power, best.sites, dense
