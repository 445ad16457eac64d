"""OWL: outlier-weighted layerwise sparsity (Yin et al., 2023).

Uniform sparsity treats every decoder layer alike, but LLM layers differ in
how many "outlier" weights they hold: weights whose Wanda score
``|W_ij| * ||X_j||`` is many times the layer's mean. Layers rich in outliers
are the ones that suffer most from pruning, so OWL prunes them less and the
others more, keeping the model's overall sparsity at the target.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import require

__all__ = ["outlier_ratio", "owl_budgets"]

MAX_SPARSITY = 0.99


def outlier_ratio(scores: torch.Tensor, threshold: float) -> float:
    """Fraction of ``scores`` above ``threshold`` times their mean (the paper's "layerwise outlier distribution")."""
    require(scores.numel() > 0, "outlier_ratio needs at least one score")
    flat = scores.detach().reshape(-1).float()
    return (flat > threshold * flat.mean()).float().mean().item()


def owl_budgets(
    outlier_ratios: Sequence[float],
    target: float,
    lam: float,
    weights: Sequence[float] | None = None,
) -> list[float]:
    """Per-layer sparsities whose (parameter-weighted) mean is exactly ``target``.

    1. Map the ratios linearly onto ``[target - lam, target + lam]``: the
       layer with the most outliers gets ``target - lam``, the one with the
       fewest ``target + lam``.
    2. Shift all budgets by one constant, and clamp them to ``[0, 0.99]``, so
       that the mean, weighted by ``weights`` (parameter counts; equal when
       omitted), is the target. The clamped mean grows monotonically with the
       shift, so bisection finds it to float64 precision.
    """
    ratios = [float(r) for r in outlier_ratios]
    require(len(ratios) > 0, "OWL needs at least one layer")
    require(all(math.isfinite(r) for r in ratios), f"outlier ratios must be finite, got {ratios}")
    require(0 <= target <= MAX_SPARSITY, f"OWL target sparsity must be in [0, {MAX_SPARSITY}], got {target}")
    require(0 <= lam < 1, f"OWL lambda must be in [0, 1), got {lam}")
    sizes = [1.0] * len(ratios) if weights is None else [float(w) for w in weights]
    require(len(sizes) == len(ratios), f"{len(sizes)} layer weights for {len(ratios)} outlier ratios")
    require(all(w > 0 for w in sizes), "layer weights (parameter counts) must be positive")

    low, high = min(ratios), max(ratios)
    spread = high - low
    raw = [target + lam - 2 * lam * ((r - low) / spread if spread > 0 else 0.5) for r in ratios]
    shift = _shift_to_mean(raw, sizes, target, 0.0, MAX_SPARSITY)
    return [min(max(b + shift, 0.0), MAX_SPARSITY) for b in raw]


def _shift_to_mean(values: list[float], weights: list[float], target: float, lo: float, hi: float) -> float:
    """The constant ``c`` with weighted mean of ``clamp(values + c, lo, hi)`` equal to ``target``."""
    total = sum(weights)

    def mean_after(shift: float) -> float:
        return sum(w * min(max(v + shift, lo), hi) for v, w in zip(values, weights)) / total

    below, above = lo - max(values), hi - min(values)  # every value clamped to lo / to hi
    for _ in range(200):
        middle = (below + above) / 2
        if mean_after(middle) < target:
            below = middle
        else:
            above = middle
        if above - below <= 1e-15:
            break
    return (below + above) / 2
