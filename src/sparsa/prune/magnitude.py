"""Magnitude pruning: drop the smallest weights of each layer.

The baseline every method is measured against. It needs no calibration data:
the score of a weight is ``|W_ij|`` and the whole layer is one pool, so rows
may end up with different sparsities.
"""

from __future__ import annotations

import torch

from .base import METHODS, LayerPruner

__all__ = ["Magnitude"]


@METHODS.register("magnitude")
class Magnitude(LayerPruner):
    """Keeps the largest ``|W|`` layer-wide (or within each N:M group)."""

    needs_inputs = False

    def select(self, sparsity: float) -> tuple[torch.Tensor, None]:
        scores = self.layer.weight.detach().float().abs()
        return self.mask(scores, sparsity, per_row=False), None
