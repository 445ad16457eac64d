"""Activation sparsity: zero the least important input channels of a layer, per token, at a calibrated threshold.

A *method* names its *sites* (where activations are cut: the input of a
linear layer, or the output of an MLP's gate activation) and a per-channel
*score* for each (``|x|``, or ``|x|`` times the weight column's norm). On
calibration text every site collects a random sample of its scores; the
site's threshold is the score quantile at the target sparsity. Applied, a
site keeps the channels whose score reaches its threshold and zeroes the
rest, token by token. Methods are one file each and register here: a
method is a function ``(model, config, batches) -> list[Site]`` (``batches``:
the calibration tokens, ``[N, L]``, for methods that measure the model).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import torch
import torch.nn as nn

from ..errors import InputError, require
from ..registry import Registry
from .cut import Cut, prepare_cut

__all__ = ["ACTIVATION_METHODS", "ActivationConfig", "Site", "in_decoder_layer", "linear_sites", "threshold_at", "weight_informed"]

ACTIVATION_METHODS: Registry[Callable] = Registry("activation sparsity method")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the weight-informed scores tried when weight_power is None; 0 is |x| alone, for layers whose weights do not
# rank channels better than the activations do (on SmolLM2-135M the search often picked the smallest power)
WEIGHT_POWERS = (0.0, 0.125, 0.25, 0.5, 1.0)
ALLOCATIONS = ("uniform", "greedy")


@dataclasses.dataclass(frozen=True)
class ActivationConfig:
    method: str = "teal"
    sparsity: float = 0.5
    targets: tuple[str, ...] = TARGETS  # linear layers (by name suffix) whose inputs are cut
    calibration: str = "shipped"
    samples: int = 16
    seq_len: int = 512
    seed: int = 0
    values_per_batch: int = 16384  # scores kept per site and calibration batch (a random sample)
    # weight-informed methods (wina, wina_fisher): the score is |x_j| * ||W[:, j]|| ** weight_power (W
    # Fisher-weighted for wina_fisher); None: the power among WEIGHT_POWERS whose cut moves the model least from
    # dense (KL of the next-token distributions) on held-out calibration text (``samples`` more windows of it,
    # disjoint from the calibration windows)
    weight_power: float | None = None
    # weight-informed methods: the linears (by name suffix, among ``targets``) whose score is weighted; the
    # others use |x_j|. None: all of them. The WINA authors' code weights k_proj and gate_proj only.
    weighted: tuple[str, ...] | None = None
    # "uniform": every site at ``sparsity``; "greedy": per decoder layer, sites raised ``greedy_step`` at a
    # time where the layer's output moves least, until the layer's weight-weighted mean reaches ``sparsity``
    allocation: str = "uniform"
    greedy_step: float = 0.1
    greedy_tokens: int = 512  # calibration tokens the greedy search runs each layer on

    def __post_init__(self) -> None:
        require(0.0 <= self.sparsity < 1.0, f"activation sparsity must be in [0, 1), got {self.sparsity}; give a fraction such as 0.5")
        require(bool(self.targets), "targets is empty; name at least one linear layer, e.g. down_proj")
        require(self.samples >= 1 and self.seq_len >= 8, "need samples >= 1 and seq_len >= 8 for calibration")
        require(self.weight_power is None or self.weight_power >= 0, "weight_power must be >= 0 (or None to calibrate it)")
        require(self.weighted is None or set(self.weighted) <= set(self.targets),
                f"weighted names layers that are not targets: {', '.join(sorted(set(self.weighted or ()) - set(self.targets)))}; "
                f"choose among {', '.join(self.targets)}")
        require(self.allocation in ALLOCATIONS, f"unknown allocation {self.allocation!r}; choose one of: {', '.join(ALLOCATIONS)}")
        require(0.0 < self.greedy_step <= 0.5, f"greedy_step must be in (0, 0.5], got {self.greedy_step}")
        require(self.greedy_tokens >= 8, "greedy_tokens must be >= 8")


@dataclasses.dataclass
class Site:
    """One place where activations are cut."""

    name: str
    module: nn.Module
    kind: str  # "input": the module's (first) input; "output": its output
    scale: torch.Tensor | None = None  # per-channel weight of the score |x_j| * scale_j (None: |x_j|)
    threshold: float | None = None
    sparsity: float | None = None  # this site's own target (greedy allocation); None: the config's
    zeros: int = 0  # counted while tracking
    total: int = 0
    _cut: tuple | None = dataclasses.field(default=None, repr=False, compare=False)  # (threshold, scale, (dtype, device), Cut)

    def channel_thresholds(self, channels: int) -> torch.Tensor:
        """float32 ``[channels]`` thresholds on ``|x_j|`` itself: what a fused kernel compares."""
        require(self.threshold is not None, f"{self.name} is not calibrated yet")
        if self.scale is None:
            return torch.full((channels,), self.threshold, dtype=torch.float32)
        return self._scaled_thresholds().cpu()

    def _scaled_thresholds(self) -> torch.Tensor:
        return self.threshold / self.scale.detach().float().clamp_min(1e-30)

    def cut(self, x: torch.Tensor, track: bool) -> torch.Tensor:
        if self.threshold is None:
            return x
        cut = self._prepared_cut(x.dtype, x.device)
        if track:
            self.zeros += int((~cut.keep(x)).sum())
            self.total += x.numel()
        return cut(x)

    def _prepared_cut(self, dtype: torch.dtype, device: torch.device) -> Cut:
        """The cut at this site's thresholds (``|x_j|`` against ``threshold / scale_j`` in float32, as the kernels
        compare), prepared once per threshold, scale and input dtype."""
        cached = self._cut
        if cached is None or cached[0] != self.threshold or cached[1] is not self.scale or cached[2] != (dtype, device):
            threshold = self.threshold if self.scale is None else self._scaled_thresholds()
            cached = self._cut = (self.threshold, self.scale, (dtype, device), prepare_cut(threshold, dtype, device))
        return cached[3]

    def install(self, tracking: Callable[[], bool] = lambda: False):
        """Cut this site in every forward (a removable hook); ``tracking()`` says whether to count zeros."""
        if self.kind == "input":
            return self.module.register_forward_pre_hook(lambda module, args: (self.cut(args[0], tracking()), *args[1:]))
        return self.module.register_forward_hook(lambda module, args, output: self.cut(output, tracking()))

    def weight_numel(self) -> int:
        """Weights this site's cut lets a kernel skip in proportion (its linear's, or the MLP's for a gate site)."""
        module = self.module
        return module.in_features * module.out_features if hasattr(module, "in_features") else 0


def weight_informed(make_sites: Callable) -> Callable:
    """Mark a method whose score carries a weight power (``config.weight_power``), which ``apply`` calibrates when unset."""
    make_sites.weight_informed = True
    return make_sites


def threshold_at(sorted_scores: torch.Tensor, sparsity: float) -> float:
    """The score with a ``sparsity`` fraction of the (sorted) sample below it; -inf at 0 (nothing is cut)."""
    if sparsity <= 0:
        return float("-inf")
    return float(sorted_scores[max(1, round(sparsity * sorted_scores.numel())) - 1])


def in_decoder_layer(name: str) -> bool:
    return re.search(r"(^|\.)layers\.\d+\.", name) is not None


def linear_sites(model: nn.Module, targets: tuple[str, ...], scale_for: Callable[[nn.Module], torch.Tensor | None]) -> list[Site]:
    """An input site for every linear layer (nn.Linear or sparsa's 2:4 layer) named ``*.<target>`` in a decoder layer."""
    from ..kernels.sparse24 import SparseLinear24

    sites = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, SparseLinear24)) and name.rsplit(".", 1)[-1] in targets and in_decoder_layer(name):
            sites.append(Site(name, module, "input", scale_for(module)))
    if not sites:
        raise InputError(f"no linear layer named {', '.join(targets)} inside the decoder layers; "
                         f"targets must be layer names such as {', '.join(TARGETS)}")
    return sites
